"""`bakallm bench`: score one of our runs or a Hugging Face model on whole articles and record the result."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bakallm.data import embedded
from bakallm.errors import UserError
from bakallm.evaluation.positions import DEFAULT_POSITION_BUCKETS, check_position_buckets
from bakallm.kernels import SCAN_BACKENDS
from bakallm.results.db import add_db_argument

if TYPE_CHECKING:
    import torch

    from bakallm.data.recall import RecallSample
    from bakallm.data.token_cache import TokenizedCorpus
    from bakallm.evaluation.evaluate import EvalResult
    from bakallm.evaluation.recall import AnswerLogProbs
    from bakallm.results.db import ResultRow

DEFAULT_DATA = embedded.HELD_OUT_CORPUS  # held out from the books `bakallm train` reads by default
DEFAULT_SPLIT = "validation"
BAKALLM_DEFAULT_N_CTX = 1_048_576
HF_DEFAULT_N_CTX = 2048
BAKALLM_DEFAULT_BATCH_SIZE = 8
HF_DEFAULT_BATCH_SIZE = 1
TASKS = ("lm", "recall")
# Flags of the recall task, refused with --task lm.
RECALL_FLAGS = ("distances", "samples", "seed", "depth", "facts", "window", "keep_document_cache")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory of `bakallm train` (its latest checkpoint) or one checkpoint folder")
    source.add_argument("--hf", metavar="NAME_OR_PATH", help="a Hugging Face causal LM instead: a local folder or a Hub name")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"corpus: a local .raw/.txt folder/.jsonl/.parquet path, wikitext-103, wikitext-2, or {embedded.TRAIN_CORPUS}[-held-out] (default {DEFAULT_DATA}, shipped with bakallm)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help=f"train, validation or test; only a label for local files (default {DEFAULT_SPLIT})")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json file or folder, Hub name, or 'bytes' (default: the run's own; for --hf the model's tokenizer.json, "
        "else EleutherAI/pythia-70m-deduped)",
    )
    parser.add_argument(
        "--n-ctx",
        type=int,
        help=f"context length: our models reset their state every N tokens (default {BAKALLM_DEFAULT_N_CTX}); "
        f"Hugging Face models read windows of N tokens (default {HF_DEFAULT_N_CTX}, or the model's limit if smaller)",
    )
    parser.add_argument("--stride", type=int, help="Hugging Face models only: tokens between window starts (default n_ctx / 2)")
    parser.add_argument(
        "--reset-every",
        type=int,
        metavar="N",
        help="our models only: also score the same tokens with the state reset every N tokens (e.g. 512), store that "
        "as a second row and print the loss by position of both, to show what the carried state is worth",
    )
    parser.add_argument(
        "--position-buckets",
        help="where the position buckets of the context-use figures start, comma-separated from 0 "
        f"(default {','.join(map(str, DEFAULT_POSITION_BUCKETS))}: 0-512, 512-2K, 2K-8K, 8K+)",
    )
    parser.add_argument(
        "--batch-size", type=int,
        help=f"articles (ours) or windows (--hf) per forward pass (default {BAKALLM_DEFAULT_BATCH_SIZE} ours, {HF_DEFAULT_BATCH_SIZE} --hf)",
    )
    parser.add_argument("--note", default="", help="free text stored with the result, e.g. 'after 2 epochs'")
    add_db_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the stored row as one JSON object on the last line")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument(
        "--scan", choices=SCAN_BACKENDS,
        help="our models only: selective scan backend; auto: triton on CUDA when it imports and passes its self-check, else blocked (default auto)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: the CPUs this process may use); on a busy machine try 1")
    parser.add_argument("--cache-dir", type=Path, help="token cache folder (default $BAKALLM_CACHE or ~/.cache/bakallm/tokens)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    recall = parser.add_argument_group(
        "recall (--task recall)",
        "plant a fact ('The code of Mary Alden is 4 8 1 2 7.') in the --data text, ask about it a given distance later "
        "('Q: What is Mary Alden's code? A:') and score the answer (docs/recall.md)",
    )
    parser.add_argument("--task", choices=TASKS, default="lm", help="lm: the loss of every token (default); recall: answers about facts read earlier")
    recall.add_argument("--distances", help="distances between fact and query, in windows, comma-separated (default 0.5,1,2,4,16,64,256)")
    recall.add_argument("--samples", type=int, help="samples per distance (default 100)")
    recall.add_argument("--seed", type=int, help="seed of the filler places, names and codes (default 0)")
    recall.add_argument("--depth", type=float, help="filler before the fact, in windows (default: drawn from [0, 1) for each sample)")
    recall.add_argument("--facts", type=int, help="facts planted one after another; the query asks about one of them (default 1)")
    recall.add_argument(
        "--window", type=int,
        help="tokens in one window, the unit of --distances and --depth (default: our model's window; for --hf its n_ctx)",
    )
    recall.add_argument(
        "--keep-document-cache", action="store_true",
        help="our models with the document cache: resets (--n-ctx, --reset-every) clear the network's state but keep the "
        "document cache, to show that the cache alone cannot answer",
    )


@dataclass
class ModelUnderTest:
    """What `bench` records of a model and how it scores a corpus, whichever kind of model it is."""

    kind: str  # a ResultRow.model_kind
    name: str
    checkpoint_path: str | None
    checkpoint_hash: str | None
    params_total: int
    params_embedding: int
    vocab_size: int
    arch_hash: str
    default_tokenizer: str | None
    default_tokenizer_note: str | None  # printed when the default tokenizer is used, if it needs saying
    default_n_ctx: int
    default_batch_size: int
    window: int | None  # our model's window; None for a transformer, which reads n_ctx tokens at a time
    attention_reach: int | None  # tokens attention can see back from a position, at most (our models); None: n_ctx
    # (corpus, n_ctx, stride, batch_size, progress, position bucket starts)
    score: Callable[[TokenizedCorpus, int, int | None, int, bool, tuple[int, ...]], EvalResult]
    answer_log_probs: AnswerLogProbs  # how it reads recall samples


def run(args: argparse.Namespace) -> int:
    from bakallm.acceleration import resolve_device, use_threads
    from bakallm.data.corpora import HUB_WIKITEXT_SPLITS, load_corpus
    from bakallm.data.token_cache import tokenize_corpus
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.evaluation.evaluate import require_positive, require_vocabulary_fits
    from bakallm.evaluation.hf_baseline import default_stride
    from bakallm.results.context_use import context_uses, format_context_use
    from bakallm.results.db import ResultsDB, default_db_path, utc_now_iso
    from bakallm.results.table import json_value

    if args.split not in HUB_WIKITEXT_SPLITS:
        raise UserError(f"Unknown split {args.split!r}; use one of {', '.join(HUB_WIKITEXT_SPLITS)}.")
    for flag, value in (("--n-ctx", args.n_ctx), ("--stride", args.stride), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None:
            require_positive(flag, value)
    use_threads(args.threads)
    if args.stride is not None and args.hf is None:
        raise UserError("--stride applies only to Hugging Face models (--hf); our models read each article once with their recurrent state.")
    if args.scan is not None and args.hf is not None:
        raise UserError("--scan applies only to our models; a Hugging Face model (--hf) runs its own code.")
    if args.reset_every is not None:
        if args.hf is not None:
            raise UserError("--reset-every applies only to our models; for a Hugging Face model run bench again with another --n-ctx.")
        require_positive("--reset-every", args.reset_every)
    _check_task_flags(args)
    position_buckets = parse_position_buckets(args.position_buckets or ",".join(map(str, DEFAULT_POSITION_BUCKETS)))
    device = resolve_device(args.device)
    # Opened first, so that a wrong --db fails now rather than after hours of scoring.
    with ResultsDB(args.db if args.db is not None else default_db_path()) as db:
        subject = _load_hf(args.hf, device, args.progress) if args.hf is not None else _load_run(args.model, device, args.progress, args.scan or "auto")
        n_ctx = args.n_ctx if args.n_ctx is not None else subject.default_n_ctx
        contexts = [n_ctx] + ([args.reset_every] if args.reset_every is not None else [])
        for flag, context in zip(("--n-ctx", "--reset-every"), contexts):
            if subject.window is not None and context < subject.window:
                raise UserError(f"{flag} {context} is smaller than the model's window of {subject.window} tokens; pass at least {subject.window}.")
        stride = None
        if subject.kind == "hf" and args.task == "lm":
            stride = args.stride if args.stride is not None else default_stride(n_ctx)
        batch_size = args.batch_size if args.batch_size is not None else subject.default_batch_size
        tokenizer = load_tokenizer(_tokenizer_spec(args.tokenizer, subject))
        require_vocabulary_fits(tokenizer.vocab_size, subject.vocab_size, tokenizer.name)
        corpus = tokenize_corpus(load_corpus(args.data, args.split), tokenizer, cache_dir=args.cache_dir, progress=args.progress)
        if args.task == "recall":
            measurements = _recall_measurements(args, subject, corpus, tokenizer, contexts, batch_size)
        else:
            measurements = (
                (context, _lm_figures(subject.score(corpus, context, stride, batch_size, args.progress, position_buckets))) for context in contexts
            )
        stored = []
        for context, (figures, extra, describe) in measurements:
            row = _result_row(subject, args, context, stride, batch_size, tokenizer.name, device, figures, extra)
            row.created_at = utc_now_iso()
            row.id = db.add(row)
            stored.append(row)
            print(describe(row, db.path))
    if len(stored) > 1 and args.task == "lm":
        print(format_context_use(context_uses(stored)), end="")
    if args.json:
        print(json.dumps({key: json_value(value) for key, value in asdict(stored[0]).items()}, sort_keys=True))
    return 0


def _check_task_flags(args: argparse.Namespace) -> None:
    if args.task == "lm":
        given = [name for name in RECALL_FLAGS if getattr(args, name) not in (None, False)]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies only to --task recall; add --task recall or drop the flag.")
        return
    if args.stride is not None:
        raise UserError("--stride applies only to --task lm; for recall a Hugging Face model reads the n_ctx tokens that end at the answer.")
    if args.position_buckets is not None:
        raise UserError("--position-buckets applies only to --task lm; recall is scored by distance (--distances).")
    if args.window is not None and args.window < 1:
        raise UserError(f"--window must be at least 1, got {args.window}.")
    if args.keep_document_cache and args.hf is not None:
        raise UserError("--keep-document-cache applies only to our models; a Hugging Face model has no document cache.")


Describe = Callable[["ResultRow", Path], str]


def _lm_figures(result: EvalResult) -> tuple[dict, dict, Describe]:
    """The row fields of a language-modelling result, its extra facts, and its printed summary."""
    figures = {
        "tokens": result.tokens, "loss": result.loss, "ppl": result.ppl, "bpb": result.bpb, "word_ppl": result.word_ppl,
        "legacy_loss": result.legacy_loss, "nan_count": result.nan_count, "tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes": result.peak_memory_bytes, "position_losses": [bucket.to_dict() for bucket in result.position_losses],
    }
    return figures, {"n_articles": result.n_articles}, lambda row, db_path: _summary(row, result, db_path)


def _recall_measurements(
    args: argparse.Namespace, subject: ModelUnderTest, corpus: TokenizedCorpus, tokenizer, contexts: list[int], batch_size: int
) -> Iterator[tuple[int, tuple[dict, dict, Describe]]]:
    """Per context: the figures of every distance (all samples drawn before anything is scored)."""
    import time

    from bakallm.data.recall import parse_distances
    from bakallm.evaluation.recall import DEFAULT_DISTANCES, RecallSettings, RecallTest, recall_figures
    from bakallm.results.table import format_recall_scores

    settings = RecallSettings(
        distances=parse_distances(args.distances) if args.distances is not None else DEFAULT_DISTANCES,
        **{name: value for name, value in (("samples", args.samples), ("seed", args.seed), ("facts", args.facts)) if value is not None},
        depth_windows=args.depth, keep_document_cache=args.keep_document_cache,
    )
    test = RecallTest.draw(settings, corpus, tokenizer, window=args.window or subject.window or contexts[0])
    extra = {**settings.extra(test.window), "attention_reach": subject.attention_reach or contexts[0]}
    for context in contexts:
        started = time.perf_counter()
        figures = recall_figures(test.score(subject.answer_log_probs, context, batch_size, args.progress))
        figures["tokens_per_s"] = test.read_tokens / (time.perf_counter() - started)
        yield context, (figures, extra, lambda row, db_path: format_recall_scores(row) + f"saved as row {row.id} of {db_path}")


def parse_position_buckets(text: str) -> tuple[int, ...]:
    """'0,512,2048' -> (0, 512, 2048), refused unless whole numbers that start at 0 and rise."""
    try:
        starts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--position-buckets {text!r} is not a comma-separated list of whole numbers; write e.g. 0,512,2048,8192.") from None
    return check_position_buckets(starts)


def _tokenizer_spec(given: str | None, subject: ModelUnderTest) -> str:
    if given is not None:
        return given
    if subject.default_tokenizer is None:
        raise UserError(f"The config.json of run {subject.name} names no tokenizer; pass the one it was trained with as --tokenizer.")
    if subject.default_tokenizer_note is not None:
        print(f"bakallm bench: {subject.default_tokenizer_note}", file=sys.stderr)
    return subject.default_tokenizer


def _load_run(path: str, device: torch.device, progress: bool, scan: str) -> ModelUnderTest:
    """A run of `bakallm train`: our model, or the transformers model of an --hf-config run."""
    from dataclasses import replace

    from bakallm.training.checkpoint import read_run_config, resolve_checkpoint
    from bakallm.training.hf_model import HF_FOLDER

    run_dir, checkpoint = resolve_checkpoint(path)
    training = read_run_config(run_dir).get("training", {})
    if not training.get("hf_config"):
        return _load_bakalm(path, device, scan)
    subject = _load_hf(str(checkpoint / HF_FOLDER), device, progress)
    return replace(subject, name=run_dir.resolve().name, default_tokenizer=training.get("tokenizer"), default_tokenizer_note=None)


def _load_bakalm(path: str, device: torch.device, scan: str) -> ModelUnderTest:
    from bakallm.acceleration import use_scan_backend
    from bakallm.evaluation.evaluate import evaluate_bakalm
    from bakallm.evaluation.recall import bakalm_answer_log_probs
    from bakallm.model.io import model_files
    from bakallm.model.network import BakaLM

    files = model_files(path)
    model = use_scan_backend(BakaLM.from_pretrained(path, device), scan)
    counts = model.num_parameters()

    def score(corpus: TokenizedCorpus, n_ctx: int, stride: int | None, batch_size: int, progress: bool, buckets: tuple[int, ...]) -> EvalResult:
        return evaluate_bakalm(model, corpus, n_ctx=n_ctx, batch_size=batch_size, device=device, progress=progress, position_buckets=buckets)

    def answer_log_probs(samples: Sequence[RecallSample], n_ctx: int, batch_size: int, keep_document_cache: bool):
        if keep_document_cache and not model.config.document_cache:
            raise UserError(f"--keep-document-cache applies to models with the document cache, and {files.name} has none; drop the flag.")
        return bakalm_answer_log_probs(model, samples, batch_size, device, n_ctx, keep_document_cache)

    return ModelUnderTest(
        kind="bakallm",
        name=files.name,
        checkpoint_path=str(files.weights.parent.resolve()),
        checkpoint_hash=_sha256_files([files.weights]),
        params_total=counts["total"],
        params_embedding=counts["embedding"],
        vocab_size=model.config.vocab_size,
        arch_hash=hashlib.sha256(model.config.to_json().encode("utf-8")).hexdigest(),
        default_tokenizer=files.tokenizer,
        default_tokenizer_note=None,
        default_n_ctx=BAKALLM_DEFAULT_N_CTX,
        default_batch_size=BAKALLM_DEFAULT_BATCH_SIZE,
        window=model.config.window,
        attention_reach=2 * model.config.window if model.config.xl_cache else model.config.window,
        score=score,
        answer_log_probs=answer_log_probs,
    )


def _load_hf(spec: str, device: torch.device, progress: bool) -> ModelUnderTest:
    from transformers.utils import logging as transformers_logging

    from bakallm.data.tokenizers import DEFAULT_TOKENIZER, TOKENIZER_FILE
    from bakallm.evaluation.hf_baseline import (
        evaluate_hf,
        hf_architecture_hash,
        hf_model_folder,
        hf_parameter_counts,
        hf_vocab_size,
        hf_weight_files,
        load_hf_model,
    )
    from bakallm.evaluation.recall import hf_answer_log_probs

    if not progress:
        transformers_logging.disable_progress_bar()
    model = load_hf_model(spec, device)
    folder = hf_model_folder(model)
    weight_files = hf_weight_files(folder) if folder is not None else []
    tokenizer_note = None
    if folder is not None and (folder / TOKENIZER_FILE).is_file():
        tokenizer = str(folder / TOKENIZER_FILE)
    elif not Path(spec).expanduser().is_dir():
        tokenizer = spec  # a Hub model: load_tokenizer fetches the tokenizer.json of its repository
    else:
        tokenizer = DEFAULT_TOKENIZER
        tokenizer_note = f"{spec} holds no {TOKENIZER_FILE}, so its text is tokenized with {DEFAULT_TOKENIZER} (choose with --tokenizer)."
    counts = hf_parameter_counts(model)
    max_positions = getattr(model.config, "max_position_embeddings", None) or HF_DEFAULT_N_CTX

    def score(corpus: TokenizedCorpus, n_ctx: int, stride: int | None, batch_size: int, progress: bool, buckets: tuple[int, ...]) -> EvalResult:
        return evaluate_hf(
            model, corpus, n_ctx=n_ctx, stride=stride, batch_size=batch_size, device=device, progress=progress, position_buckets=buckets
        )

    return ModelUnderTest(
        kind="hf",
        name=spec,
        checkpoint_path=str(folder) if folder is not None else None,
        checkpoint_hash=_sha256_files(weight_files) if weight_files else None,
        params_total=counts["total"],
        params_embedding=counts["embedding"],
        vocab_size=hf_vocab_size(model),
        arch_hash=hf_architecture_hash(model),
        default_tokenizer=tokenizer,
        default_tokenizer_note=tokenizer_note,
        default_n_ctx=min(HF_DEFAULT_N_CTX, max_positions),
        default_batch_size=HF_DEFAULT_BATCH_SIZE,
        window=None,
        attention_reach=None,
        score=score,
        answer_log_probs=lambda samples, n_ctx, batch_size, keep_document_cache: hf_answer_log_probs(model, samples, n_ctx, batch_size, device),
    )


def _sha256_files(paths: list[Path]) -> str:
    """One hash of the files' contents, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _result_row(
    subject: ModelUnderTest,
    args: argparse.Namespace,
    n_ctx: int,
    stride: int | None,
    batch_size: int,
    tokenizer: str,
    device: torch.device,
    figures: dict,
    extra: dict,
) -> ResultRow:
    """The row of one measurement: what was measured on which model (`figures`: the measured fields)."""
    from bakallm import __version__
    from bakallm.results.db import ResultRow

    return ResultRow(
        model_kind=subject.kind,
        model_name=subject.name,
        benchmark=args.data,
        split=args.split,
        n_ctx=n_ctx,
        checkpoint_path=subject.checkpoint_path,
        checkpoint_hash=subject.checkpoint_hash,
        params_total=subject.params_total,
        params_embedding=subject.params_embedding,
        stride=stride,
        tokenizer=tokenizer,
        note=args.note,
        arch_hash=subject.arch_hash,
        version=__version__,
        extra={**extra, "batch_size": batch_size, "device": str(device)},
        **figures,
    )


def _summary(row: ResultRow, result: EvalResult, db_path: Path) -> str:
    def figure(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    return (
        f"{row.model_name}: loss {figure(row.loss, '.4f')}, ppl {figure(row.ppl, '.2f')}, bpb {figure(row.bpb, '.4f')}, "
        f"word ppl {figure(row.word_ppl, '.2f')}, legacy loss {figure(row.legacy_loss, '.4f')} over {row.tokens:,} tokens "
        f"of {result.n_articles} articles ({row.benchmark} {row.split}, n_ctx {row.n_ctx}"
        + (f", stride {row.stride}" if row.stride is not None else "")
        + f"{f', {row.nan_count} NaN tokens left out' if row.nan_count else ''}); "
        f"{figure(row.tokens_per_s, ',.0f')} tokens/s; saved as row {row.id} of {db_path}"
    )
