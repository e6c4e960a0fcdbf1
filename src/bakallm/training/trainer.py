"""The training loop: dynamic batching, carried recurrent state, AdamW, checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bakallm import __version__
from bakallm.acceleration import autocast_dtype, compile_layers, resolve_device
from bakallm.config import ModelConfig
from bakallm.data.batching import Batch, DocumentBatcher
from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import TokenizedCorpus, tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.errors import UserError
from bakallm.evaluation.evaluate import scored_token_count
from bakallm.model import BakaLM
from bakallm.state import RecurrentState
from bakallm.training import checkpoint as ckpt
from bakallm.training.arguments import RESUMABLE_CHANGES, TrainConfig, train_config_from_values
from bakallm.training.metrics import MetricsLog

# Parameters that are not matrices of a linear map or an embedding get no weight decay.
NO_DECAY_NAMES = ("pause", "initial_memory", "write_slots", "A_log")


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then the configured decay down to min_lr_ratio * lr at total_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return config.lr * (1 - (1 - floor) * progress)


def build_model_config(config: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset, with the fields of the --model-config file over it, sized for the tokenizer."""
    overrides: dict[str, Any] = {}
    if config.model_config:
        path = Path(config.model_config)
        if not path.is_file():
            raise UserError(f"Model config file {path} does not exist; pass a JSON file of ModelConfig fields.")
        try:
            overrides = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"Model config file {path} is not valid JSON ({error.msg} at line {error.lineno}); fix it.") from None
    if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
        raise UserError(f"The model's vocab_size {overrides['vocab_size']} is smaller than the tokenizer's {vocab_size}; raise it or use another tokenizer.")
    try:
        return ModelConfig.preset(config.preset, **{**overrides, "vocab_size": max(vocab_size, overrides.get("vocab_size", 0))})
    except ValueError as error:
        raise UserError(str(error)) from None


def untrained_memory_warning(config: TrainConfig, model_config: ModelConfig) -> str | None:
    """Why the memory slots cannot learn under these settings, or None when they can.

    The write slots sit at the end of a window, so only the next window's loss can train what they
    write; with steps of one window that next window lies beyond the truncated backpropagation, and
    the write slots get exactly zero gradient (docs/quality.md measures it).
    """
    if model_config.n_memory == 0 or config.train_ctx >= 2 * model_config.window:
        return None
    return (
        f"--train-ctx {config.train_ctx} spans less than two windows of {model_config.window} tokens, so the "
        f"{model_config.n_memory} memory write slots get no gradient and never learn what to write; "
        f"use --train-ctx {2 * model_config.window} or more (fewer --batch-size rows keep the tokens per step)."
    )


def _parameter_groups(model: BakaLM, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        wants_decay = parameter.dim() >= 2 and not any(part in name.split(".") for part in NO_DECAY_NAMES)
        (decay if wants_decay else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, config: TrainConfig, explicit: set[str] | None = None):
        explicit = explicit or set()
        if config.resume:
            config = self._resume_config(config, explicit)
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.autocast_dtype = autocast_dtype(config.precision, self.device)
        self.run_dir = Path(config.run_dir or config.resume or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        if not config.resume and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise UserError(f"{self.run_dir} already holds a run; pass --resume {self.run_dir} to continue it or choose another --run-dir.")

        self.tokenizer = load_tokenizer(config.tokenizer)
        self.model_config = build_model_config(config, self.tokenizer.vocab_size)
        self.warning = untrained_memory_warning(config, self.model_config)
        if self.warning is not None:
            print(f"bakallm train: warning: {self.warning}", file=sys.stderr)
        if config.resume:
            saved_model = ModelConfig.from_dict(ckpt.read_run_config(self.run_dir)["model"])
            changed = saved_model.differences(self.model_config)
            if changed:
                raise UserError(
                    f"Cannot resume {self.run_dir}: model field {changed[0]} differs ({getattr(saved_model, changed[0])} saved, {getattr(self.model_config, changed[0])} now); drop the flags that change it."
                )
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.corpus: TokenizedCorpus = tokenize_corpus(load_corpus(config.data, config.split), self.tokenizer, cache_dir, progress=config.progress)
        self.batcher = DocumentBatcher(
            self.corpus, config.batch_size, config.train_ctx, mode=config.batching, shuffle=config.shuffle, seed=config.seed
        )
        self.eval_corpus = None
        if config.eval_data:
            self.eval_corpus = tokenize_corpus(load_corpus(config.eval_data, config.eval_split), self.tokenizer, cache_dir)

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model = BakaLM(self.model_config)
        if config.init_from:
            self._load_initial_weights(config.init_from)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(self.model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), fused=self.device.type == "cuda"
        )
        self.step = 0
        self.epochs_done = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.state: RecurrentState | None = None
        self.planned_steps = self._planned_steps()
        self.schedule_steps = config.decay_steps or self.planned_steps
        if config.resume:
            self._restore(ckpt.latest_checkpoint(self.run_dir))
        else:
            ckpt.write_run_config(self.run_dir, self.model_config, {**config.to_dict(), "run_dir": str(self.run_dir), "version": __version__})
        self.metrics = MetricsLog(self.run_dir, tensorboard=config.tensorboard, wandb_project=config.wandb_project)
        self.metrics.truncate_after(self.step)
        self.forward_model = compile_layers(self.model) if config.compile else self.model
        self._pending: list[dict[str, Any]] = []
        self._smoothed_loss: float | None = None

    # ----- setup -----
    @staticmethod
    def _resume_config(config: TrainConfig, explicit: set[str]) -> TrainConfig:
        run_dir = Path(config.resume)
        if ckpt.latest_checkpoint(run_dir) is None:
            raise UserError(f"{run_dir} holds no checkpoint to resume from; check the path or start a new run with --run-dir.")
        saved = ckpt.read_run_config(run_dir)["training"]
        saved.pop("version", None)
        current = config.to_dict()
        for name in sorted(explicit - RESUMABLE_CHANGES):
            if current[name] != saved.get(name):
                flag = "--" + name.replace("_", "-")
                raise UserError(
                    f"Cannot resume {run_dir}: {flag} is {current[name]!r} but the run used {saved.get(name)!r}; drop the flag or start a new run."
                )
        merged = {**saved, **{name: current[name] for name in explicit & RESUMABLE_CHANGES}, "resume": str(run_dir), "run_dir": str(run_dir)}
        return train_config_from_values(merged)

    def _load_initial_weights(self, source: str) -> None:
        source_run, checkpoint = ckpt.resolve_checkpoint(source)
        source_config = ModelConfig.from_dict(ckpt.read_run_config(source_run)["model"])
        changed = source_config.differences(self.model_config)
        if changed:
            raise UserError(
                f"Cannot start from {source}: model field {changed[0]} differs ({getattr(source_config, changed[0])} there, {getattr(self.model_config, changed[0])} here); use the same preset and tokenizer."
            )
        ckpt.load_weights(self.model, checkpoint)

    def _planned_steps(self) -> int:
        """Steps the run will take: --max-steps, or an estimate from the corpus size for --epochs."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        epochs = self.config.epochs or 1
        targets = scored_token_count(self.corpus)  # every token of a document but its first is a target
        per_step = self.config.batch_size * self.config.train_ctx * self.config.grad_accum
        return max(1, epochs * math.ceil(targets / per_step))

    @property
    def max_epochs(self) -> int | None:
        if self.config.epochs is not None:
            return self.config.epochs
        return None if self.config.max_steps is not None else 1

    # ----- checkpoints -----
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epochs_done": self.epochs_done,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "batcher": self.batcher.state_dict(),
        }

    def save(self, name: str | None = None) -> Path:
        self._flush_metrics()
        recurrent = self.state.to_dict() if self.state is not None else None
        return ckpt.save_checkpoint(
            self.run_dir, name or ckpt.step_name(self.step), self.model, self.optimizer, self._trainer_state(), recurrent, _rng_state(), self.config.keep_last
        )

    def _restore(self, checkpoint_path: Path) -> None:
        ckpt.load_weights(self.model, checkpoint_path)
        loaded = ckpt.load_checkpoint(checkpoint_path)
        self.optimizer.load_state_dict(loaded.optimizer_state)
        trainer_state = loaded.trainer_state
        self.step = trainer_state["step"]
        self.epochs_done = trainer_state["epochs_done"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.elapsed = trainer_state["elapsed"]
        self.batcher.load_state_dict(trainer_state["batcher"])
        if loaded.recurrent_state is not None:
            self.state = RecurrentState.from_dict(loaded.recurrent_state).to(self.device)
        if loaded.rng_state is not None:
            _restore_rng(loaded.rng_state)

    # ----- training -----
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _micro_step(self, batch: Batch, weight: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed loss, detached."""
        device = self.device
        input_ids = batch.input_ids.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        state, reset = (self.state, batch.reset.to(device, non_blocking=True)) if self.config.carry_state else (None, None)
        with self._autocast():
            output = self.forward_model(input_ids, state=state, reset=reset if state is not None else None, targets=targets, return_logits=False)
        (output.loss * weight).backward()
        if self.config.carry_state:
            self.state = output.state.detach()
        return output.loss.detach() * batch.n_targets

    def train_step(self) -> list[Batch]:
        config = self.config
        started = time.perf_counter()
        self.model.train()
        batches = [self.batcher.next_batch() for _ in range(config.grad_accum)]
        n_targets = sum(batch.n_targets for batch in batches)
        loss_sum = sum(self._micro_step(batch, batch.n_targets / max(n_targets, 1)) for batch in batches)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        lr = learning_rate(config, self.step, self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_targets
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        self._pending.append(
            {"step": self.step, "epoch": batches[-1].epoch, "tokens": self.tokens_seen, "loss": loss_sum / max(n_targets, 1),
             "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_targets / seconds, "time": self.elapsed}
        )
        return batches

    def _flush_metrics(self) -> None:
        """Writes pending step metrics; the one host synchronisation, so done only every log_every steps."""
        if not self._pending:
            return
        losses = torch.stack([torch.as_tensor(entry["loss"]) for entry in self._pending]).float().cpu().tolist()
        norms = torch.stack([torch.as_tensor(entry["grad_norm"]) for entry in self._pending]).float().cpu().tolist()
        for entry, loss, norm in zip(self._pending, losses, norms):
            if not math.isfinite(loss):
                latest = ckpt.latest_checkpoint(self.run_dir)
                kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint had been saved yet"
                raise UserError(
                    f"The training loss became {loss} at step {entry['step']}; {kept}. Lower --lr or check the data, then resume."
                )
            self.metrics.log_step(**{**entry, "loss": loss, "grad_norm": norm})
            self._smoothed_loss = loss if self._smoothed_loss is None else 0.95 * self._smoothed_loss + 0.05 * loss
        self._last_logged = self._pending[-1]
        self._pending = []

    def evaluate(self) -> dict[str, float]:
        from bakallm.evaluation.evaluate import evaluate_bakalm

        self.model.eval()
        result = evaluate_bakalm(
            self.forward_model, self.eval_corpus, n_ctx=self.config.eval_n_ctx, batch_size=self.config.batch_size,
            device=self.device, autocast=self.autocast_dtype,
        )
        self.metrics.log_eval(step=self.step, tokens=self.tokens_seen, loss=result.loss, ppl=result.ppl, bpb=result.bpb, data=self.config.eval_data)
        return {"loss": result.loss, "ppl": result.ppl, "bpb": result.bpb}

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(total=self.planned_steps, initial=self.step, unit="step", disable=not config.progress, dynamic_ncols=True)
        last_eval: dict[str, float] | None = None
        try:
            while not self._finished():
                batches = self.train_step()
                bar.update(1)
                if self.step % config.log_every == 0:
                    self._flush_metrics()
                    bar.set_postfix(
                        epoch=f"{batches[-1].epoch + batches[-1].epoch_fraction:.3f}",
                        loss=f"{self._smoothed_loss:.4f}",
                        tok_s=f"{self._last_logged['tokens_per_s']:.0f}",
                    )
                if any(batch.epoch_end for batch in batches):
                    self.epochs_done += 1
                    self.save(f"epoch-{self.epochs_done}")
                if config.eval_every and self.step % config.eval_every == 0:
                    last_eval = self.evaluate()
                if self.step % config.save_every == 0:
                    self.save()
            self._flush_metrics()
            if not (self.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_name(self.step)).exists():
                self.save()
            if self.eval_corpus is not None and not (config.eval_every and self.step % config.eval_every == 0):
                last_eval = self.evaluate()
        finally:
            bar.close()
            self.metrics.close()
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "epochs_done": self.epochs_done, "tokens": self.tokens_seen,
                   "loss": self._smoothed_loss}
        if last_eval:
            summary["eval_loss"] = last_eval["loss"]
        return summary

    def _finished(self) -> bool:
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            return True
        return self.max_epochs is not None and self.epochs_done >= self.max_epochs
