"""`bakallm bench`: score one of our runs or a Hugging Face model on whole articles and record the result."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bakallm.commands import options
from bakallm.data import embedded
from bakallm.errors import UserError
from bakallm.evaluation.positions import DEFAULT_POSITION_BUCKETS, check_position_buckets
from bakallm.evaluation.settings import OUR_BATCH_SIZE, OUR_N_CTX, TRANSFORMER_BATCH_SIZE, TRANSFORMER_N_CTX

if TYPE_CHECKING:
    import torch

    from bakallm.data.token_cache import TokenizedCorpus
    from bakallm.evaluation.settings import EvalSettings
    from bakallm.evaluation.tally import EvalResult
    from bakallm.kinds import ModelKind
    from bakallm.results.db import ResultRow
    from bakallm.results.rows import ModelRecord

DEFAULT_DATA = embedded.HELD_OUT_CORPUS  # held out from the books `bakallm train` reads by default
DEFAULT_SPLIT = "validation"
TASKS = ("lm", "recall")
# Flags of the recall task, refused with --task lm.
RECALL_FLAGS = ("distances", "samples", "seed", "depth", "facts", "window", "keep_document_cache")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "model",
        nargs="?",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory of `bakallm train` (its latest checkpoint) or one checkpoint folder",
    )
    source.add_argument(
        "--hf", metavar="NAME_OR_PATH", help="a Hugging Face causal LM instead: a local folder or a Hub name"
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"corpus: a local .raw/.txt folder/.jsonl/.parquet path, wikitext-103, wikitext-2, or {embedded.TRAIN_CORPUS}[-held-out] (default {DEFAULT_DATA}, shipped with bakallm)",
    )
    parser.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help=f"train, validation or test; only a label for local files (default {DEFAULT_SPLIT})",
    )
    options.add_tokenizer(
        parser, "the run's own; for --hf the model's tokenizer.json, else EleutherAI/pythia-70m-deduped"
    )
    parser.add_argument(
        "--n-ctx",
        type=int,
        help=f"context length: our models reset their state every N tokens (default {OUR_N_CTX}); "
        f"Hugging Face models read windows of N tokens (default {TRANSFORMER_N_CTX}, or the model's limit if smaller)",
    )
    parser.add_argument(
        "--stride", type=int, help="Hugging Face models only: tokens between window starts (default n_ctx / 2)"
    )
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
        "--batch-size",
        type=int,
        help=f"articles (ours) or windows (--hf) per forward pass (default {OUR_BATCH_SIZE} ours, {TRANSFORMER_BATCH_SIZE} --hf)",
    )
    parser.add_argument("--note", default="", help="free text stored with the result, e.g. 'after 2 epochs'")
    options.add_db(parser)
    parser.add_argument("--json", action="store_true", help="print the stored row as one JSON object on the last line")
    options.add_device(parser)
    options.add_scan(parser, ours_only=True)
    options.add_eval_precision(parser)
    options.add_threads(parser)
    options.add_cache_dir(parser)
    options.add_progress(parser)
    recall = parser.add_argument_group(
        "recall (--task recall)",
        "plant a fact ('The code of Mary Alden is 4 8 1 2 7.') in the --data text, ask about it a given distance later "
        "('Q: What is Mary Alden's code? A:') and score the answer (docs/recall.md)",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="lm",
        help="lm: the loss of every token (default); recall: answers about facts read earlier",
    )
    recall.add_argument(
        "--distances",
        help="distances between fact and query, in windows, comma-separated (default 0.5,1,2,4,16,64,256)",
    )
    recall.add_argument("--samples", type=int, help="samples per distance (default 100)")
    recall.add_argument("--seed", type=int, help="seed of the filler places, names and codes (default 0)")
    recall.add_argument(
        "--depth", type=float, help="filler before the fact, in windows (default: drawn from [0, 1) for each sample)"
    )
    recall.add_argument(
        "--facts", type=int, help="facts planted one after another; the query asks about one of them (default 1)"
    )
    recall.add_argument(
        "--window",
        type=int,
        help="tokens in one window, the unit of --distances and --depth (default: our model's window; for --hf its n_ctx)",
    )
    recall.add_argument(
        "--keep-document-cache",
        action="store_true",
        help="our models with the document cache: resets (--n-ctx, --reset-every) clear the network's state but keep the "
        "document cache, to show that the cache alone cannot answer",
    )


@dataclass
class ModelUnderTest:
    """A model `bench` scores, whichever kind it is, and what its rows record of it."""

    kind: ModelKind
    model: torch.nn.Module
    record: ModelRecord
    default_tokenizer: str | None
    default_tokenizer_note: str | None  # printed when the default tokenizer is used, if it needs saying


def run(args: argparse.Namespace) -> int:
    import torch

    from bakallm.acceleration import resolve_device, use_threads
    from bakallm.data.corpora import HUB_WIKITEXT_SPLITS, load_corpus
    from bakallm.data.token_cache import tokenize_corpus
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.evaluation.articles import require_positive, require_vocabulary_fits
    from bakallm.evaluation.settings import EvalSettings
    from bakallm.results.context_use import context_uses, format_context_use
    from bakallm.results.db import ResultsDB, default_db_path, utc_now_iso
    from bakallm.results.rows import result_row
    from bakallm.results.table import json_value

    if args.split not in HUB_WIKITEXT_SPLITS:
        raise UserError(f"Unknown split {args.split!r}; use one of {', '.join(HUB_WIKITEXT_SPLITS)}.")
    for flag, value in (
        ("--n-ctx", args.n_ctx),
        ("--stride", args.stride),
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
    ):
        if value is not None:
            require_positive(flag, value)
    use_threads(args.threads)
    if args.scan is not None and args.hf is not None:
        raise UserError("--scan applies only to our models; a Hugging Face model (--hf) runs its own code.")
    if args.precision is not None and args.hf is not None:
        raise UserError("--precision applies only to our models; a Hugging Face model (--hf) is scored in float32.")
    precision = args.precision or "float32"
    if args.reset_every is not None:
        if args.hf is not None:
            raise UserError(
                "--reset-every applies only to our models; for a Hugging Face model run bench again with another --n-ctx."
            )
        require_positive("--reset-every", args.reset_every)
    _check_task_flags(args)
    position_buckets = parse_position_buckets(args.position_buckets or ",".join(map(str, DEFAULT_POSITION_BUCKETS)))
    device = resolve_device(args.device)
    # Opened first, so that a wrong --db fails now rather than after hours of scoring.
    with ResultsDB(args.db if args.db is not None else default_db_path()) as db:
        subject = _load(args, device)
        kind, model = subject.kind, subject.model
        if args.stride is not None and kind.carries_state:
            raise UserError(
                "--stride applies only to Hugging Face models (--hf); our models read each article once with their recurrent state."
            )
        n_ctx = args.n_ctx if args.n_ctx is not None else kind.default_n_ctx(model)
        contexts = [n_ctx] + ([args.reset_every] if args.reset_every is not None else [])
        window = kind.window(model)
        for flag, context in zip(("--n-ctx", "--reset-every"), contexts):
            if window is not None and context < window:
                raise UserError(
                    f"{flag} {context} is smaller than the model's window of {window} tokens; pass at least {window}."
                )
        batch_size = args.batch_size if args.batch_size is not None else kind.default_eval_batch_size
        tokenizer = load_tokenizer(_tokenizer_spec(args.tokenizer, subject))
        require_vocabulary_fits(tokenizer.vocab_size, kind.vocab_size(model), tokenizer.name)
        corpus = tokenize_corpus(
            load_corpus(args.data, args.split), tokenizer, cache_dir=args.cache_dir, progress=args.progress
        )
        if args.task == "recall":
            measurements = _recall_measurements(args, subject, corpus, tokenizer, contexts, batch_size, device)
        else:
            settings = [
                EvalSettings(
                    n_ctx=context,
                    stride=args.stride,
                    batch_size=batch_size,
                    device=device,
                    progress=args.progress,
                    position_buckets=position_buckets,
                )
                for context in contexts
            ]
            measurements = (_lm_measurement(kind, model, corpus, each) for each in settings)  # each stored once scored
        stored = []
        # Measurements are computed as the loop asks for them: one autocast covers the scoring of either task.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            for context, stride, (figures, extra, describe) in measurements:
                row = result_row(
                    subject.record,
                    args.data,
                    args.split,
                    context,
                    stride,
                    tokenizer.name,
                    figures,
                    {**extra, "batch_size": batch_size, "device": str(device), "precision": precision},
                    note=args.note,
                )
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
            raise UserError(
                f"--{given[0].replace('_', '-')} applies only to --task recall; add --task recall or drop the flag."
            )
        return
    if args.stride is not None:
        raise UserError(
            "--stride applies only to --task lm; for recall a Hugging Face model reads the n_ctx tokens that end at the answer."
        )
    if args.position_buckets is not None:
        raise UserError("--position-buckets applies only to --task lm; recall is scored by distance (--distances).")
    if args.window is not None and args.window < 1:
        raise UserError(f"--window must be at least 1, got {args.window}.")
    if args.keep_document_cache and args.hf is not None:
        raise UserError("--keep-document-cache applies only to our models; a Hugging Face model has no document cache.")


Describe = Callable[["ResultRow", Path], str]


def _lm_measurement(
    kind: ModelKind, model: torch.nn.Module, corpus: TokenizedCorpus, settings: EvalSettings
) -> tuple[int, int | None, tuple[dict, dict, Describe]]:
    """(context, stride, (the row's figures, its extra facts, its printed summary)) of one scoring."""
    from bakallm.results.rows import lm_figures

    result = kind.evaluate(model, corpus, settings)
    summary = lambda row, db_path: _summary(row, result, db_path)
    return settings.n_ctx, kind.stride(settings), (lm_figures(result), {"n_articles": result.n_articles}, summary)


def _recall_measurements(
    args: argparse.Namespace,
    subject: ModelUnderTest,
    corpus: TokenizedCorpus,
    tokenizer,
    contexts: list[int],
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[int, None, tuple[dict, dict, Describe]]]:
    """Per context: (context, no stride, the figures of every distance); all samples are drawn before anything is scored."""
    import time

    from bakallm.data.recall import parse_distances
    from bakallm.evaluation.recall import DEFAULT_DISTANCES, RecallSettings, RecallTest, recall_figures
    from bakallm.results.table import format_recall_scores

    kind, model = subject.kind, subject.model
    settings = RecallSettings(
        distances=parse_distances(args.distances) if args.distances is not None else DEFAULT_DISTANCES,
        **{
            name: value
            for name, value in (("samples", args.samples), ("seed", args.seed), ("facts", args.facts))
            if value is not None
        },
        depth_windows=args.depth,
        keep_document_cache=args.keep_document_cache,
    )
    test = RecallTest.draw(settings, corpus, tokenizer, window=args.window or kind.window(model) or contexts[0])
    extra = {**settings.extra(test.window), "attention_reach": kind.attention_reach(model) or contexts[0]}

    def answer_log_probs(samples, n_ctx, batch_size, keep_document_cache):
        return kind.answer_log_probs(model, samples, n_ctx, batch_size, device, keep_document_cache)

    for context in contexts:
        started = time.perf_counter()
        figures = recall_figures(test.score(answer_log_probs, context, batch_size, args.progress))
        figures["tokens_per_s"] = test.read_tokens / (time.perf_counter() - started)
        yield (
            context,
            None,
            (figures, extra, lambda row, db_path: format_recall_scores(row) + f"saved as row {row.id} of {db_path}"),
        )


def parse_position_buckets(text: str) -> tuple[int, ...]:
    """'0,512,2048' -> (0, 512, 2048), refused unless whole numbers that start at 0 and rise."""
    try:
        starts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--position-buckets {text!r} is not a comma-separated list of whole numbers; write e.g. 0,512,2048,8192."
        ) from None
    return check_position_buckets(starts)


def _tokenizer_spec(given: str | None, subject: ModelUnderTest) -> str:
    if given is not None:
        return given
    if subject.default_tokenizer is None:
        raise UserError(
            f"The config.json of run {subject.record.name} names no tokenizer; pass the one it was trained with as --tokenizer."
        )
    if subject.default_tokenizer_note is not None:
        print(f"bakallm bench: {subject.default_tokenizer_note}", file=sys.stderr)
    return subject.default_tokenizer


def _load(args: argparse.Namespace, device: torch.device) -> ModelUnderTest:
    """The model of --hf (a transformers folder or Hub name), or of a run of `bakallm train` (of
    either kind), one of its checkpoints, or a folder of `bakallm export`."""
    from bakallm.kinds import kind_named, kind_of_path, model_record

    _quiet_transformers(args.progress)
    path = args.hf if args.hf is not None else args.model
    kind, training = (kind_named("hf"), {}) if args.hf is not None else kind_of_path(path)
    model = kind.prepare(kind.load(path, device), args.scan or "auto")
    tokenizer, note = kind.default_tokenizer(model, path, training)
    return ModelUnderTest(
        kind, model, model_record(kind, model, _name(path, args.hf is not None), path), tokenizer, note
    )


def _name(path: str, hub_or_folder: bool) -> str:
    """The name rows record: a --hf spec as given; the run directory's name, also for one of its checkpoint folders."""
    from bakallm.model.io import is_exported_folder
    from bakallm.runs import resolve_checkpoint

    folder = Path(path)
    if hub_or_folder:
        return path
    return folder.resolve().name if is_exported_folder(folder) else resolve_checkpoint(folder)[0].resolve().name


def _quiet_transformers(progress: bool) -> None:
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


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
