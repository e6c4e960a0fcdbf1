"""`bakallm first-run`: a first result that means something, on any machine, in about ten minutes.

Trains the `tiny` preset and a plain transformer of the same size for the same minutes on the books
shipped with the package (data/embedded.py), then scores both on the held-out book beside two
baselines that need no training (uniform guessing and token frequencies), shows how the loss
changes with the position in the book when our model reads it whole and when its state is reset
every window, and writes a sample. The rows go to the results database (`bakallm results --study
first-run`).

Equal minutes, not equal tokens: what a user with one machine and an afternoon cares about. Each
model's steps are planned from a short timed probe of its own training step, so the learning-rate
schedule ends when the minutes do and the run stays resumable like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bakallm.atomic import write_text_atomic
from bakallm.commands import options
from bakallm.data import embedded
from bakallm.errors import UserError

STUDY = "first-run"
DEFAULT_MINUTES = 4.0
# Steps timed to plan a run (after one untimed step that warms up allocations and kernels).
PROBE_STEPS = 3
SAMPLE_TOKENS = 60
PROMPT_WORDS = 12  # the prompt: the first words of the held-out book's first line of prose
# A whole-document reading: longer than any document.
WHOLE_N_CTX = 1 << 40


@dataclass(frozen=True)
class Contender:
    name: str
    label: str  # how the table names it
    model_fields: dict[str, Any]  # ModelConfig fields over the preset


def plain_transformer_fields(preset: str, vocab_size: int, train_ctx: int) -> dict[str, Any]:
    """Fields that turn `preset` into a plain transformer reading windows of `train_ctx` tokens
    (no Mamba, memory, pauses or cache: nothing crosses a window), with its feed-forward width chosen
    so that it has as many parameters outside the embeddings as the preset (to within 1%)."""
    from bakallm.model.config import ModelConfig
    from bakallm.model.network import BakaLM

    def non_embedding(config: ModelConfig) -> int:
        counts = BakaLM(config).num_parameters()
        return counts["total"] - counts["embedding"]

    ours = ModelConfig.preset(preset, vocab_size=vocab_size)
    plain = ours.replace(mamba=False, n_memory=0, n_pauses=0, xl_cache=False, window=train_ctx)
    # Parameters grow linearly with d_ff: two counts give the slope.
    base, wider = non_embedding(plain), non_embedding(plain.replace(d_ff=plain.d_ff + 64))
    d_ff = plain.d_ff + round((non_embedding(ours) - base) / ((wider - base) / 64) / 16) * 16
    return {"mamba": False, "n_memory": 0, "n_pauses": 0, "xl_cache": False, "window": train_ctx, "d_ff": max(16, d_ff)}


def unigram_loss(train_tokens, held_out) -> float:
    """Nats per held-out target token of a model that knows only the training tokens' frequencies
    (add-one smoothed), scored on the same targets as the models (every token after an article's first)."""
    import numpy as np

    counts = (
        np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=held_out.vocab_size).astype(np.float64) + 1.0
    )
    log_probs = np.log(counts / counts.sum())
    targets = np.concatenate([held_out.document(index)[1:] for index in range(len(held_out))]).astype(np.int64)
    return float(-log_probs[targets].mean())


def planned_steps(config, minutes: float) -> tuple[int, float]:
    """Steps of `config` that fit in `minutes`, from a timed probe of its training step, and the
    seconds one step took."""
    from bakallm.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bakallm-probe-") as folder:
        probe = Trainer(replace(config, run_dir=folder, max_steps=PROBE_STEPS + 1, progress=False))
        probe.train_step()
        started = time.perf_counter()
        for _ in range(PROBE_STEPS):
            probe.train_step()
        seconds = (time.perf_counter() - started) / PROBE_STEPS
    return max(1, int(minutes * 60 / seconds)), seconds


def _base_config(run_dir: Path, args: argparse.Namespace):
    from bakallm.training.arguments import TrainConfig

    # The tiny-cpu recipe's settings, on the shipped books and tokenizer.
    return TrainConfig(
        preset="tiny",
        data=embedded.TRAIN_CORPUS,
        tokenizer=embedded.TOKENIZER,
        batch_size=4,
        train_ctx=512,
        lr=2e-3,
        schedule="cosine",
        shuffle=True,
        seed=args.seed,
        run_dir=str(run_dir),
        progress=args.progress,
        threads=args.threads,
        log_every=25,
        keep_last=1,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"training minutes for each of the two models (default {DEFAULT_MINUTES:g})",
    )
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/first-run"), help="folder of the two runs (default runs/first-run)"
    )
    options.add_db(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs and of the sample (default 0)")
    options.add_threads(parser)
    options.add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from bakallm.data.corpora import load_corpus
    from bakallm.data.token_cache import tokenize_corpus
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.evaluation.evaluate import evaluate_bakallm
    from bakallm.evaluation.settings import EvalSettings
    from bakallm.generation import Sampling, generate_text
    from bakallm.kinds import model_record
    from bakallm.results.db import ResultsDB
    from bakallm.results.rows import lm_figures, result_row
    from bakallm.training import checkpoint as ckpt
    from bakallm.training.trainer import Trainer

    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        raise UserError(f"--minutes must be a positive number, got {args.minutes}.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}.")
    run_root = args.run_dir.resolve()
    if run_root.exists() and any(run_root.iterdir()):
        raise UserError(f"{run_root} is not empty; pass another --run-dir (or delete the old first run).")
    tokenizer = load_tokenizer(embedded.TOKENIZER)
    base = _base_config(run_root, args)
    contenders = [
        Contender("bakallm-tiny", "bakallm tiny", {}),
        Contender(
            "plain-transformer",
            f"plain transformer, {base.train_ctx}-token windows",
            plain_transformer_fields(base.preset, tokenizer.vocab_size, base.train_ctx),
        ),
    ]
    print(
        f"bakallm first-run: training two models for {args.minutes:g} minutes each on the books shipped with bakallm, "
        f"then scoring them on a book they never saw; the results go to {run_root}."
    )
    trained = {}
    for contender in contenders:
        model_file = run_root / f"{contender.name}.json"
        write_text_atomic(model_file, json.dumps(contender.model_fields, indent=2, sort_keys=True))
        config = replace(base, run_dir=str(run_root / contender.name), model_config=str(model_file))
        steps, seconds = planned_steps(config, args.minutes)
        print(f"\n{contender.label}: {seconds:.2f} s per step here, so {steps} steps fit in {args.minutes:g} minutes")
        trainer = Trainer(replace(config, max_steps=steps, warmup_steps=max(1, min(20, steps // 10)), save_every=steps))
        started = time.perf_counter()
        trainer.train()
        trained[contender.name] = (trainer, time.perf_counter() - started)

    held_out = tokenize_corpus(load_corpus(embedded.HELD_OUT_CORPUS), tokenizer)
    ours, _ = trained["bakallm-tiny"]
    device = ours.device
    readings = [
        ("uniform guess", math.log(tokenizer.vocab_size), ()),
        ("unigram (token frequencies of the training books)", unigram_loss(ours.corpus.tokens, held_out), ()),
    ]
    rows = []
    for contender in contenders:
        trainer, train_seconds = trained[contender.name]
        model = trainer.model.eval()
        record = model_record(trainer.kind, model, f"{STUDY}/{contender.name}", ckpt.latest_checkpoint(trainer.run_dir))
        window = model.config.window
        contexts = (
            [("read whole", WHOLE_N_CTX)]
            if contender.name == "plain-transformer"
            else [(f"state reset every {window} tokens", window), ("read whole", WHOLE_N_CTX)]
        )
        for reading, n_ctx in contexts:
            result = evaluate_bakallm(
                model, held_out, EvalSettings(n_ctx=n_ctx, batch_size=1, device=device, progress=args.progress)
            )
            readings.append((f"{contender.label}, {reading}", result.loss, result.position_losses))
            extra = {
                "reading": reading,
                "train_steps": trainer.step,
                "train_tokens": trainer.tokens_seen,
                "train_seconds": train_seconds,
            }
            rows.append(
                result_row(
                    record,
                    embedded.HELD_OUT_CORPUS,
                    "test",
                    n_ctx,
                    None,
                    tokenizer.name,
                    lm_figures(result),
                    extra,
                    study=STUDY,
                )
            )
    with ResultsDB(args.db) as db:
        for row in rows:
            db.add(row)

    book = next(iter(load_corpus(embedded.HELD_OUT_CORPUS))).text
    prompt = " ".join(next(line for line in book.splitlines() if len(line) > 60).split()[:PROMPT_WORDS])
    sample = generate_text(
        ours.model, tokenizer, [prompt], SAMPLE_TOKENS, Sampling(temperature=0.8, top_k=40, seed=args.seed)
    )[0]
    training = [
        f"{contender.label}: {trained[contender.name][0].step:,} steps, {trained[contender.name][0].tokens_seen:,} tokens read "
        f"in {trained[contender.name][1] / 60:.1f} minutes"
        for contender in contenders
    ]
    print()
    print(report(readings, held_out.n_tokens, ours.corpus.n_tokens, training, prompt, sample))
    return 0


def report(
    readings: Sequence[tuple[str, float, Sequence[Any]]],
    held_out_tokens: int,
    train_tokens: int,
    training: Sequence[str],
    prompt: str,
    sample: str,
) -> str:
    """The first run's table, what it means, and the sample."""
    buckets = next((positions for _, _, positions in readings if positions), ())
    header = f"{'':58} {'loss':>6}" + "".join(f" {bucket.label:>7}" for bucket in buckets)
    lines = [
        f"Trained on books of {train_tokens:,} tokens:",
        *(f"  {line}" for line in training),
        "",
        f"Held-out loss in nats per token on The Time Machine ({held_out_tokens:,} tokens, never trained on), in all and by position in the book:",
        header,
    ]
    for name, loss, positions in readings:
        lines.append(f"{name:58} {loss:6.3f}" + "".join(f" {bucket.loss:7.3f}" for bucket in positions))
    lines += [
        "",
        "What this means: the uniform guess is what an untrained model scores; the unigram line is the",
        "best a model can do without reading context. Every point below it is language the model learned:",
        "which word follows which. The plain transformer of the same size had the same minutes. Read whole,",
        "our model carries its state across the book; its later positions should score no worse than with",
        "the state reset every window, and better where the book repeats what came before. A few minutes on",
        "a CPU is a sanity check, not a benchmark: train longer on real corpora next (README, Train).",
        "",
        f"Sample (our model, temperature 0.8) after the prompt {prompt!r}:",
        prompt + sample,
    ]
    return "\n".join(lines)
