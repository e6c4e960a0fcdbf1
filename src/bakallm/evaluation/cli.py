"""`bakallm bench`: score one of our runs or a Hugging Face model on whole articles and record the result."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bakallm.errors import UserError

if TYPE_CHECKING:
    import torch

    from bakallm.data.token_cache import TokenizedCorpus
    from bakallm.evaluation.evaluate import EvalResult
    from bakallm.results.db import ResultRow

DEFAULT_DATA = "wikitext-103"
DEFAULT_SPLIT = "validation"
BAKALLM_DEFAULT_N_CTX = 1_048_576
HF_DEFAULT_N_CTX = 2048
BAKALLM_DEFAULT_BATCH_SIZE = 8
HF_DEFAULT_BATCH_SIZE = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory of `bakallm train` (its latest checkpoint) or one checkpoint folder")
    source.add_argument("--hf", metavar="NAME_OR_PATH", help="a Hugging Face causal LM instead: a local folder or a Hub name")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"corpus: wikitext-103, wikitext-2, or a local .raw/.txt folder/.jsonl/.parquet path (default {DEFAULT_DATA})")
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
        "--batch-size", type=int,
        help=f"articles (ours) or windows (--hf) per forward pass (default {BAKALLM_DEFAULT_BATCH_SIZE} ours, {HF_DEFAULT_BATCH_SIZE} --hf)",
    )
    parser.add_argument("--note", default="", help="free text stored with the result, e.g. 'after 2 epochs'")
    parser.add_argument("--db", type=Path, help="results database (default: $BAKALLM_RESULTS_DB, else ./results/results.sqlite3)")
    parser.add_argument("--json", action="store_true", help="print the stored row as one JSON object on the last line")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--cache-dir", type=Path, help="token cache folder (default $BAKALLM_CACHE or ~/.cache/bakallm/tokens)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


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
    default_tokenizer: str
    default_n_ctx: int
    default_batch_size: int
    score: Callable[[TokenizedCorpus, int, int | None, int, bool], EvalResult]  # (corpus, n_ctx, stride, batch_size, progress)
    stride_of: Callable[[int, int | None], int | None]  # the stride a run records, from (n_ctx, --stride)


def run(args: argparse.Namespace) -> int:
    from bakallm.acceleration import resolve_device
    from bakallm.data.corpora import HUB_WIKITEXT_SPLITS, load_corpus
    from bakallm.data.token_cache import tokenize_corpus
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.evaluation.evaluate import require_positive, require_vocabulary_fits
    from bakallm.results.db import ResultsDB, default_db_path, utc_now_iso

    if args.split not in HUB_WIKITEXT_SPLITS:
        raise UserError(f"Unknown split {args.split!r}; use one of {', '.join(HUB_WIKITEXT_SPLITS)}.")
    for flag, value in (("--n-ctx", args.n_ctx), ("--stride", args.stride), ("--batch-size", args.batch_size)):
        if value is not None:
            require_positive(flag, value)
    if args.stride is not None and args.hf is None:
        raise UserError("--stride applies only to Hugging Face models (--hf); our models read each article once with their recurrent state.")
    device = resolve_device(args.device)
    subject = _load_hf(args.hf, device) if args.hf is not None else _load_bakalm(args.model, device)
    n_ctx = args.n_ctx if args.n_ctx is not None else subject.default_n_ctx
    batch_size = args.batch_size if args.batch_size is not None else subject.default_batch_size
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else subject.default_tokenizer)
    require_vocabulary_fits(tokenizer.vocab_size, subject.vocab_size, tokenizer.name)
    corpus = tokenize_corpus(load_corpus(args.data, args.split), tokenizer, cache_dir=args.cache_dir, progress=args.progress)
    result = subject.score(corpus, n_ctx, args.stride, batch_size, args.progress)
    row = _result_row(subject, result, args, n_ctx, batch_size, tokenizer.name, device)
    row.created_at = utc_now_iso()
    with ResultsDB(args.db if args.db is not None else default_db_path()) as db:
        row.id = db.add(row)
        db_path = db.path
    print(_summary(row, result, db_path))
    if args.json:
        print(json.dumps({key: _json_value(value) for key, value in asdict(row).items()}, sort_keys=True))
    return 0


def _load_bakalm(path: str, device: torch.device) -> ModelUnderTest:
    from bakallm.evaluation.evaluate import evaluate_bakalm
    from bakallm.model import BakaLM
    from bakallm.training.checkpoint import MODEL_FILE, read_run_config, resolve_checkpoint

    run_dir, checkpoint = resolve_checkpoint(path)
    model = BakaLM.from_pretrained(path, device)
    tokenizer = read_run_config(run_dir).get("training", {}).get("tokenizer")
    if not isinstance(tokenizer, str):
        tokenizer = ""  # only an error if --tokenizer is missing too, see below
    counts = model.num_parameters()

    def score(corpus: TokenizedCorpus, n_ctx: int, stride: int | None, batch_size: int, progress: bool) -> EvalResult:
        return evaluate_bakalm(model, corpus, n_ctx=n_ctx, batch_size=batch_size, device=device, progress=progress)

    return ModelUnderTest(
        kind="bakallm",
        name=run_dir.resolve().name,
        checkpoint_path=str(checkpoint.resolve()),
        checkpoint_hash=_sha256_files([checkpoint / MODEL_FILE]),
        params_total=counts["total"],
        params_embedding=counts["embedding"],
        vocab_size=model.config.vocab_size,
        arch_hash=hashlib.sha256(model.config.to_json().encode("utf-8")).hexdigest(),
        default_tokenizer=tokenizer,
        default_n_ctx=BAKALLM_DEFAULT_N_CTX,
        default_batch_size=BAKALLM_DEFAULT_BATCH_SIZE,
        score=score,
        stride_of=lambda n_ctx, stride: None,
    )
