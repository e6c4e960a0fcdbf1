"""Corpora: re-iterable streams of documents from WikiText on the Hugging Face Hub or from local files.

A spec is either an existing local path (a WikiText `.raw`/`.tokens` file, a `.txt` file, a folder
of `.txt` files, a `.jsonl` file or a `.parquet` file), one of the books shipped with the package
(data/embedded.py) or one of the hub names in `HUB_WIKITEXT`. An existing path always wins over a
name of the same spelling.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bakallm.data import embedded
from bakallm.errors import UserError

# Corpus name -> (hub repository, dataset configuration).
HUB_WIKITEXT = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}
HUB_WIKITEXT_SPLITS = ("train", "validation", "test")

# Short, so that a machine without network fails in seconds instead of after the
# Hub client's minute of retries.
HUB_TIMEOUT_S = 10.0

# Part of every fingerprint: bump it when a reader's output changes, so old token caches go stale.
READER_VERSION = "corpus-readers-v1"

WIKITEXT_SUFFIXES = (".raw", ".tokens")
# A top-level WikiText heading is ` = Title = `; section headings ` = = Section = = ` do not match.
_ARTICLE_HEADING = re.compile(r" = ([^=].*) = \n?")
_HUB_ROWS_PER_READ = 10_000
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named source of documents that can be read any number of times.

    `read_documents` opens a fresh pass over the source on each call; `source_fingerprint`
    identifies the source content (see `fingerprint`).
    """

    name: str
    source_fingerprint: str
    read_documents: Callable[[], Iterator[Document]]

    def __iter__(self) -> Iterator[Document]:
        return self.read_documents()

    def fingerprint(self) -> str:
        """A stable hash of where the documents come from: it changes when the source changes."""
        return self.source_fingerprint


def load_corpus(spec: str, split: str = "train") -> Corpus:
    """Open the corpus named by `spec`; `split` only matters for hub names (local sources ignore it)."""
    path = Path(spec).expanduser()
    if path.exists():
        corpus = _local_corpus(path)
    elif embedded.corpus_folder(spec) is not None:
        corpus = _local_corpus(embedded.corpus_folder(spec), name=spec)
    elif spec in HUB_WIKITEXT:
        corpus = _hub_wikitext_corpus(spec, split)
    else:
        raise UserError(
            f"No file or folder at {spec}; pass an existing path, {embedded.TRAIN_CORPUS} or {embedded.HELD_OUT_CORPUS} "
            f"(the books shipped with bakallm), or one of the hub corpora {', '.join(HUB_WIKITEXT)}."
        )
    # Read the first document now, so that an empty source fails here rather than deep inside training.
    if next(iter(corpus), None) is None:
        raise UserError(
            f"Corpus {spec} holds no documents; point it at a folder of .txt files, a .jsonl or .parquet file "
            "with a text field, or a WikiText file with ` = Title = ` heading lines."
        )
    return corpus


def hub_revision(repo_id: str, repo_type: str, advice: str) -> str:
    """The current commit of a Hub repository, or a UserError that ends with `advice`.

    Asked with a short timeout and no retries, so that it doubles as a fast reachability check.
    """
    from huggingface_hub import HfApi

    if hub_offline_mode_requested():
        raise UserError(f"{repo_id} is on the Hugging Face Hub but offline mode is on (HF_HUB_OFFLINE); {advice}.")
    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S).sha
    except Exception as error:  # whatever went wrong, the Hub cannot serve this repository now
        raise UserError(
            f"Could not reach {repo_id} on the Hugging Face Hub ({type(error).__name__}); {advice}."
        ) from error


def hub_offline_mode_requested() -> bool:
    """Whether the environment asks for Hub offline mode now.

    Read at call time, because the Hub libraries read these variables once at import.
    """
    from huggingface_hub import constants

    requested = (
        os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return constants.HF_HUB_OFFLINE or any(value in _TRUE_VALUES for value in requested)


# ----- WikiText: rows to articles -----


def wikitext_rows(lines: Iterable[str]) -> Iterator[str]:
    """Lines of a WikiText file as Hugging Face `datasets` gives them: whitespace-only lines become ""."""
    for line in lines:
        yield line if line.strip() else ""


def wikitext_articles(rows: Iterable[str]) -> Iterator[Document]:
    """Group WikiText rows into articles, each starting at its top-level heading row.

    Rows before the first heading are dropped: in WikiText they are a single blank row.
    """
    title: str | None = None
    article_rows: list[str] = []
    for row in rows:
        heading = _ARTICLE_HEADING.fullmatch(row)
        if heading is not None:
            if title is not None:
                yield Document(id=title, text="".join(article_rows))
            title, article_rows = heading.group(1), []
        if title is not None:
            article_rows.append(row)
    if title is not None:
        yield Document(id=title, text="".join(article_rows))


def _hub_wikitext_corpus(spec: str, split: str) -> Corpus:
    import datasets

    if split not in HUB_WIKITEXT_SPLITS:
        raise UserError(f"Unknown split {split!r} for {spec}; use one of {', '.join(HUB_WIKITEXT_SPLITS)}.")
    repo_id, config_name = HUB_WIKITEXT[spec]
    advice = "pass the path of a local copy instead, for example a wiki.valid.raw file"
    try:
        revision: str | None = hub_revision(repo_id, "dataset", advice)
    except UserError:
        # Only `datasets` in its own offline mode may look in its cache: otherwise it would
        # spend a minute retrying the network before giving up.
        if not datasets.config.HF_HUB_OFFLINE:
            raise
        revision = None
    try:
        dataset = datasets.load_dataset(repo_id, config_name, split=split, revision=revision)
    except ConnectionError as error:
        raise UserError(f"Could not load {spec} from the Hugging Face Hub or its local cache; {advice}.") from error

    def read_rows() -> Iterator[str]:
        for batch in dataset.iter(batch_size=_HUB_ROWS_PER_READ):
            yield from batch["text"]

    return Corpus(
        name=f"{spec}-{split}",
        source_fingerprint=_hash_parts(READER_VERSION, "hub", repo_id, config_name, split, dataset._fingerprint),
        read_documents=lambda: wikitext_articles(read_rows()),
    )


# ----- local sources -----


def _local_corpus(path: Path, name: str | None = None) -> Corpus:
    path = path.resolve()
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix == ".txt" and child.is_file())
        return Corpus(name or path.name, _stat_fingerprint("txt-folder", files), lambda: _read_text_files(files))
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[Path], Iterator[Document]]] = {
        **{wikitext_suffix: _read_wikitext_file for wikitext_suffix in WIKITEXT_SUFFIXES},
        ".txt": lambda file: _read_text_files([file]),
        ".jsonl": _read_jsonl,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise UserError(
            f"Cannot read {path.name}: corpus files must end in .raw, .tokens, .txt, .jsonl or .parquet "
            "(or pass a folder of .txt files)."
        )
    reader = readers[suffix]
    return Corpus(path.name, _stat_fingerprint(suffix, [path]), lambda: reader(path))


def _stat_fingerprint(kind: str, files: list[Path]) -> str:
    # Path, size and modification time: cheap to compute, and any edit changes it.
    parts = [READER_VERSION, kind]
    for file in files:
        stat = file.stat()
        parts += [str(file), str(stat.st_size), str(stat.st_mtime_ns)]
    return _hash_parts(*parts)


def _hash_parts(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def _decode(data: bytes, path: Path, line_number: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        where = f"{path} (line {line_number})" if line_number is not None else str(path)
        raise UserError(f"{where} is not valid UTF-8 text; convert the file to UTF-8 and try again.") from error


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    # Binary mode splits on "\n" only and keeps "\r" and "\n" as they are, like the Hub's rows.
    with path.open("rb") as file:
        for line_number, line in enumerate(file, start=1):
            yield line_number, _decode(line, path, line_number)


def _read_wikitext_file(path: Path) -> Iterator[Document]:
    return wikitext_articles(wikitext_rows(line for _, line in _read_lines(path)))


def _read_text_files(files: list[Path]) -> Iterator[Document]:
    for file in files:
        yield Document(id=file.name, text=_decode(file.read_bytes(), file))


def _read_jsonl(path: Path) -> Iterator[Document]:
    for line_number, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} line {line_number} is not valid JSON; each line must be one JSON object."
            ) from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path} line {line_number} has no string field "text"; give every record one.')
        yield Document(id=str(record.get("id", f"{path.name}:{line_number}")), text=record["text"])


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet

    parquet_file = pyarrow.parquet.ParquetFile(path)
    column_names = parquet_file.schema_arrow.names
    if "text" not in column_names:
        raise UserError(f'{path} has no column "text" (it has {", ".join(column_names)}); add one with the documents.')
    columns = ["text", "id"] if "id" in column_names else ["text"]
    row_number = 0
    for batch in parquet_file.iter_batches(columns=columns):
        texts = batch.column("text").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            yield Document(id=str(doc_id) if doc_id is not None else f"{path.name}:{row_number}", text=text or "")
            row_number += 1
