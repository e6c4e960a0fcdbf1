"""The training loop: dynamic batching, carried recurrent state, AdamW, checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bakallm import __version__
from bakallm.acceleration import autocast_dtype, compile_layers
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
from bakallm.training.distributed import Distributed
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


def _restore_rng(saved: dict[str, Any], rank: int) -> None:
    """Restores this rank's generators; after a change of world size, a new rank continues rank 0's."""
    state = saved.get(f"rank{rank}", saved["rank0"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, config: TrainConfig, explicit: set[str] | None = None, distributed: Distributed | None = None):
        """`distributed`: the ranks of a torchrun launch (bakallm.training.distributed.launch); default one process."""
        explicit = explicit or set()
        if config.resume:
            config = self._resume_config(config, explicit)
        config.validate()
        self.config = config
        self.distributed = distributed or Distributed()
        self.global_rows = config.batch_size * self.distributed.world_size
        self.device = self.distributed.device(config.device)
        self.autocast_dtype = autocast_dtype(config.precision, self.device)
        self.run_dir = Path(config.run_dir or config.resume or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        if not config.resume and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise UserError(f"{self.run_dir} already holds a run; pass --resume {self.run_dir} to continue it or choose another --run-dir.")

        self.tokenizer = load_tokenizer(config.tokenizer)
        self.model_config = build_model_config(config, self.tokenizer.vocab_size)
        if config.resume:
            saved_model = ModelConfig.from_dict(ckpt.read_run_config(self.run_dir)["model"])
            changed = saved_model.differences(self.model_config)
            if changed:
                raise UserError(
                    f"Cannot resume {self.run_dir}: model field {changed[0]} differs ({getattr(saved_model, changed[0])} saved, {getattr(self.model_config, changed[0])} now); drop the flags that change it."
                )
        checkpoint = ckpt.latest_checkpoint(self.run_dir) if config.resume else None
        if checkpoint is not None:
            self._check_resumed_rows(checkpoint)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.eval_corpus = None
        with self.distributed.local_main_first():
            show_progress = config.progress and self.distributed.is_main
            self.corpus: TokenizedCorpus = tokenize_corpus(load_corpus(config.data, config.split), self.tokenizer, cache_dir, progress=show_progress)
            if config.eval_data:
                self.eval_corpus = tokenize_corpus(load_corpus(config.eval_data, config.eval_split), self.tokenizer, cache_dir)
        self.batcher = DocumentBatcher(
            self.corpus, self.global_rows, config.train_ctx, mode=config.batching, shuffle=config.shuffle, seed=config.seed,
            rows=self.distributed.rows(config.batch_size),
        )

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model = BakaLM(self.model_config)
        if config.init_from:
            self._load_initial_weights(config.init_from)
        if checkpoint is not None:
            ckpt.load_weights(self.model, checkpoint)  # into the whole model, before FSDP2 shards it
        self.model.to(self.device)
        self.forward_model = self.distributed.wrap(compile_layers(self.model) if config.compile else self.model, self.device, config.fsdp)
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
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.distributed.is_main:
            ckpt.write_run_config(self.run_dir, self.model_config, {**config.to_dict(), "run_dir": str(self.run_dir), "version": __version__})
        self.metrics: MetricsLog | None = None  # only rank 0 writes metrics
        if self.distributed.is_main:
            self.metrics = MetricsLog(self.run_dir, tensorboard=config.tensorboard, wandb_project=config.wandb_project)
            self.metrics.truncate_after(self.step)
        self._pending: list[dict[str, Any]] = []
        # Known on every rank alike, unlike the checkpoint folder that only rank 0 writes.
        self._step_saved: int | None = self.step if checkpoint is not None and checkpoint.name == ckpt.step_name(self.step) else None
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
        per_step = self.global_rows * self.config.train_ctx * self.config.grad_accum
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
            "world_size": self.distributed.world_size,
            "batcher": self.batcher.state_dict(),
        }

    def save(self, name: str | None = None) -> Path | None:
        """Every rank takes part (gathering the shards and rows); rank 0 writes. Returns the folder on rank 0."""
        self._flush_metrics()
        weights = self.distributed.full_weights(self.model)
        optimizer_state = self.distributed.full_optimizer_state(self.model, self.optimizer)
        recurrent = self.distributed.gather_rows(self.state.to_dict()) if self.state is not None else None
        rng_states = self.distributed.gather_objects(_rng_state())
        if name is None:
            self._step_saved = self.step
        if not self.distributed.is_main:
            return None
        return ckpt.save_checkpoint(
            self.run_dir, name or ckpt.step_name(self.step), ckpt.savable_weights(self.model, weights), optimizer_state, self._trainer_state(),
            recurrent, {f"rank{rank}": state for rank, state in enumerate(rng_states)}, self.config.keep_last,
        )

    def _check_resumed_rows(self, checkpoint: Path) -> None:
        """A run resumes on any split of the same global rows over ranks, and on nothing else."""
        saved = ckpt.read_trainer_state(checkpoint)
        saved_rows, saved_world = saved["batcher"]["batch_size"], saved.get("world_size", 1)
        if saved_rows != self.global_rows:
            raise UserError(
                f"Cannot resume {self.run_dir}: it trained {saved_rows} rows per step ({saved_world} ranks x {saved_rows // saved_world}) but this launch gives "
                f"{self.distributed.world_size} ranks x --batch-size {self.config.batch_size} = {self.global_rows}; keep ranks x --batch-size at {saved_rows}."
            )

    def _restore(self, checkpoint_path: Path) -> None:
        """Everything but the weights, which are loaded before the model is wrapped."""
        loaded = ckpt.load_checkpoint(checkpoint_path)
        self.distributed.load_optimizer_state(self.model, self.optimizer, loaded.optimizer_state)
        trainer_state = loaded.trainer_state
        self.step = trainer_state["step"]
        self.epochs_done = trainer_state["epochs_done"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.elapsed = trainer_state["elapsed"]
        self.batcher.load_state_dict(trainer_state["batcher"])
        if loaded.recurrent_state is not None:
            own_rows = list(self.distributed.rows(self.config.batch_size))
            self.state = RecurrentState.from_dict(loaded.recurrent_state).select(own_rows).to(self.device)
        if loaded.rng_state is not None:
            _restore_rng(loaded.rng_state, self.distributed.rank)

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
        n_targets = sum(batch.total_targets for batch in batches)  # over all ranks' rows: every rank knows the global batch
        # DDP and FSDP2 average gradients over ranks; scaling by the world size turns that average into the
        # sum of token losses / all ranks' targets, so rows with more padding weigh no more than others.
        scale = self.distributed.world_size / max(n_targets, 1)
        loss_sum = 0.0
        for index, batch in enumerate(batches):
            with self.distributed.gradient_sync(self.forward_model, enabled=index == len(batches) - 1):
                loss_sum = loss_sum + self._micro_step(batch, batch.n_targets * scale)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
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
        # Each rank's loss is its own token losses over all ranks' targets: their sum is the step's loss.
        losses = self.distributed.sum(torch.stack([torch.as_tensor(entry["loss"]) for entry in self._pending]).float()).cpu().tolist()
        norms = torch.stack([torch.as_tensor(entry["grad_norm"]) for entry in self._pending]).float().cpu().tolist()
        for entry, loss, norm in zip(self._pending, losses, norms):
            if not math.isfinite(loss):
                latest = ckpt.latest_checkpoint(self.run_dir)
                kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint had been saved yet"
                raise UserError(
                    f"The training loss became {loss} at step {entry['step']}; {kept}. Lower --lr or check the data, then resume."
                )
            if self.metrics is not None:
                self.metrics.log_step(**{**entry, "loss": loss, "grad_norm": norm})
            self._smoothed_loss = loss if self._smoothed_loss is None else 0.95 * self._smoothed_loss + 0.05 * loss
        self._last_logged = self._pending[-1]
        self._pending = []

    def evaluate(self) -> dict[str, float]:
        from bakallm.evaluation.evaluate import evaluate_bakalm

        # Every rank evaluates the whole corpus (FSDP2 needs all ranks in each forward); rank 0 logs.
        self.model.eval()
        result = evaluate_bakalm(
            self.model, self.eval_corpus, n_ctx=self.config.eval_n_ctx, batch_size=self.config.batch_size,
            device=self.device, autocast=self.autocast_dtype,
        )
        if self.metrics is not None:
            self.metrics.log_eval(step=self.step, tokens=self.tokens_seen, loss=result.loss, ppl=result.ppl, bpb=result.bpb, data=self.config.eval_data)
        return {"loss": result.loss, "ppl": result.ppl, "bpb": result.bpb}

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        config = self.config
        show_progress = config.progress and self.distributed.is_main
        bar = tqdm(total=self.planned_steps, initial=self.step, unit="step", disable=not show_progress, dynamic_ncols=True)
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
            if self._step_saved != self.step:
                self.save()
            if self.eval_corpus is not None and not (config.eval_every and self.step % config.eval_every == 0):
                last_eval = self.evaluate()
        finally:
            bar.close()
            if self.metrics is not None:
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
