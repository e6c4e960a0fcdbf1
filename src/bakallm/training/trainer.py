"""The training loop: dynamic batching, carried recurrent state, AdamW, checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bakallm import __version__
from bakallm.acceleration import (
    autocast_dtype,
    checkpoint_layers,
    compile_layers,
    keep_freed_host_memory,
    use_threads,
)
from bakallm.data.batching import Batch, DocumentBatcher
from bakallm.data.corpora import load_corpus
from bakallm.data.recall import FactWriter, mix_recall
from bakallm.data.token_cache import TokenizedCorpus, tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.errors import UserError
from bakallm.evaluation.settings import EvalSettings
from bakallm.kernels.scan import resolve_scan_backend
from bakallm.kinds import kind_of_run
from bakallm.locks import RunLock
from bakallm.model.state import RecurrentState
from bakallm.training import checkpoint as ckpt
from bakallm.training.arguments import RELOCATABLE_ARGUMENTS, RESUMABLE_CHANGES, TrainConfig, train_config_from_values
from bakallm.training.distributed import Distributed
from bakallm.training.interrupt import GracefulInterrupt
from bakallm.training.metrics import MetricsLog
from bakallm.training.progress import ProgressReport
from bakallm.training.schedule import Schedule

# Parameters that are not matrices of a linear map or an embedding get no weight decay.
NO_DECAY_NAMES = ("pause", "initial_memory", "write_slots", "A_log")
# Facts about a run saved beside its training arguments in config.json (not arguments themselves).
RUN_FACTS = ("version", "corpus_fingerprint", "tokenizer_fingerprint")


def planned_schedule(config: TrainConfig, decay_steps: int) -> Schedule:
    return Schedule.planned(config.schedule, config.lr, config.min_lr_ratio, config.warmup_steps, decay_steps)


def padding_warning(batcher: DocumentBatcher, batches: int) -> str | None:
    """Why a run of whole epochs that takes `batches` batches will be mostly padding, or None.

    An epoch cannot take fewer steps than its longest document needs; when that is more than the
    corpus fills, the other rows run out of documents and idle (docs/quality.md, Finding 2).
    """
    if batcher.max_epochs is None or batcher.mode == "windows":
        return None
    rows, ctx = batcher.batch_size, batcher.train_ctx
    filled = math.ceil(batcher.max_epochs * batcher.targets_per_epoch / (rows * ctx))
    if filled >= 0.75 * batches:
        return None
    piece = max(ctx, batcher.targets_per_epoch // (4 * rows) // ctx * ctx)
    longest = batcher.longest_document_targets
    return (
        f"{batcher.max_epochs} epoch(s) will take {batches} batches where the tokens fill {filled} "
        f"(about {1 - filled / batches:.0%} padding): the longest document ({longest:,} tokens) keeps one of the {rows} rows "
        f"busy for {math.ceil(longest / ctx)} batches while the others run out of documents; cut documents with "
        f"--max-doc-tokens {piece} or use fewer --batch-size rows."
    )


def _parameter_groups(model: torch.nn.Module, weight_decay: float, scope: str) -> list[dict[str, Any]]:
    if scope == "all":
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
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
    def __init__(
        self, config: TrainConfig, explicit: Collection[str] | None = None, distributed: Distributed | None = None
    ):
        """`explicit`: the arguments given by the user (a mapping to where each came from, for error
        messages, or just their names); `distributed`: the ranks of a torchrun launch
        (bakallm.training.distributed.launch); default one process."""
        explicit = (
            explicit
            if isinstance(explicit, Mapping)
            else {name: "--" + name.replace("_", "-") for name in explicit or ()}
        )
        config = config.with_resolved_paths()
        saved_facts: dict[str, Any] = {}
        if config.resume:
            config, saved_facts = self._resume_config(config, explicit)
        config.validate()
        self.config = config
        use_threads(config.threads)
        self.distributed = distributed or Distributed()
        self.global_rows = config.batch_size * self.distributed.world_size
        self.device = self.distributed.device(config.device)
        if config.keep_host_memory and self.device.type == "cpu":
            keep_freed_host_memory()
        resolve_scan_backend(config.scan, self.device)  # a forced backend that cannot run fails before the data is read
        self.autocast_dtype = autocast_dtype(config.precision, self.device)
        self.run_dir = Path(
            config.run_dir or config.resume or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        ).resolve()
        # Held until train() ends: a second process on this run directory is refused (rank 0 holds it for all ranks).
        self._lock = RunLock(self.run_dir) if self.distributed.is_main else None
        try:
            self._set_up(config, saved_facts)
        except BaseException:
            if self._lock is not None:  # a trainer that never came to be holds nothing
                self._lock.release()
            raise

    def _set_up(self, config: TrainConfig, saved_facts: dict[str, Any]) -> None:
        """The rest of __init__, run while the run directory's lock is held."""
        if not config.resume and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise UserError(
                f"{self.run_dir} already holds a run; pass --resume {self.run_dir} to continue it or choose another --run-dir."
            )

        self.tokenizer = load_tokenizer(config.tokenizer)
        self._require_same_source("tokenizer", saved_facts.get("tokenizer_fingerprint"), self.tokenizer.fingerprint())
        self.kind = kind_of_run(config.to_dict())
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model = self.kind.build(
            config.to_dict(), self.tokenizer.vocab_size, quiet=not (config.progress and sys.stderr.isatty())
        )
        self.warnings = self.kind.training_warnings(config.to_dict(), self.model)
        for warning in self.warnings:
            self._warn(warning)
        if config.resume:
            self.kind.check_resume(ckpt.read_run_config(self.run_dir)["model"], self.model, self.run_dir)
        checkpoint = ckpt.resumable_checkpoint(self.run_dir, self._warn) if config.resume else None
        if config.resume and checkpoint is None:
            raise UserError(
                f"{self.run_dir} holds no checkpoint to resume from; check the path or start a new run with --run-dir."
            )
        if checkpoint is not None:
            self._check_resumed_rows(checkpoint)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.eval_corpus = None
        with self.distributed.local_main_first():
            show_progress = config.progress and self.distributed.is_main
            source = load_corpus(config.data, config.split)
            self.corpus_name = source.name
            self.corpus: TokenizedCorpus = tokenize_corpus(source, self.tokenizer, cache_dir, progress=show_progress)
            self._require_same_source("data", saved_facts.get("corpus_fingerprint"), self.corpus.fingerprint)
            if config.eval_data:
                self.eval_corpus = tokenize_corpus(
                    load_corpus(config.eval_data, config.eval_split), self.tokenizer, cache_dir
                )
        corpus_fingerprint = self.corpus.fingerprint  # of the source, before any recall facts are planted
        scored = None
        if config.recall_every is not None:
            mix = mix_recall(
                self.corpus,
                FactWriter(self.tokenizer),
                config.recall_every,
                config.recall_max_distance,
                config.seed,
                config.recall_overlap,
            )
            self.corpus, scored = mix.corpus, mix.scored(config.recall_lm_share, config.seed)
        self.batcher = DocumentBatcher(
            self.corpus,
            self.global_rows,
            config.train_ctx,
            mode=config.batching,
            shuffle=config.shuffle,
            seed=config.seed,
            max_epochs=self.max_epochs,
            max_doc_tokens=config.max_doc_tokens,
            rows=self.distributed.rows(config.batch_size),
            scored=scored,
        )

        if config.init_from:
            self._load_initial_weights(config.init_from)
        if checkpoint is not None:
            ckpt.load_weights(self.model, checkpoint)  # into the whole model, before FSDP2 shards it
        self.model = self.kind.prepare(self.model.to(self.device), config.scan)
        if config.precision == "pure-bfloat16":
            self.model.to(torch.bfloat16)  # AdamW then keeps its moments in bfloat16 too
        if config.activation_checkpointing:
            checkpoint_layers(self.kind.blocks(self.model))
        self.carry_state = config.carry_state and self.kind.carries_state
        model = compile_layers(self.model) if config.compile else self.model
        self.forward_model = self.distributed.wrap(model, self.device, config.fsdp, self.kind.blocks(model))
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(self.model, config.weight_decay, config.weight_decay_scope),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            # One kernel per parameter instead of several passes with fresh temporaries: on a CPU
            # 4.5x faster than the default loop (celp18's 144M parameters, one thread), equal to it to 4e-9.
            fused=True,
        )
        self.step = 0
        self.skipped_steps = 0  # steps whose gradients were not finite: no update (see _skip_step)
        self.skipped_in_a_row = 0
        self.epochs_done = 0
        self.tokens_seen = 0  # tokens read (each predicts a target, unless the recall recipe leaves it unscored)
        self.positions_seen = 0  # batch positions processed, tokens or padding
        self.epoch_progress = {"steps": 0, "positions": 0, "targets": 0}  # of the epoch in progress
        self.elapsed = 0.0
        self.state: RecurrentState | None = None
        self.planned_steps = self._planned_steps()
        if checkpoint is not None:
            self.schedule = planned_schedule(
                config, config.decay_steps or self.planned_steps
            )  # for runs saved without one
            self._restore(checkpoint)
            if config.new_decay:
                self.schedule = self.schedule.with_new_decay(self.step, self.planned_steps)
        else:
            # The horizon is fixed now and saved: no later resume with other --max-steps or --epochs moves it.
            self.config.decay_steps = config.decay_steps or self.planned_steps
            self.schedule = planned_schedule(config, self.config.decay_steps)
            if self.distributed.is_main:
                facts = {
                    "version": __version__,
                    "corpus_fingerprint": corpus_fingerprint,
                    "tokenizer_fingerprint": self.tokenizer.fingerprint(),
                }
                ckpt.write_run_config(
                    self.run_dir,
                    self.kind.config_values(self.model),
                    {**config.to_dict(), "run_dir": str(self.run_dir), **facts},
                )
        self.metrics: MetricsLog | None = None  # only rank 0 writes metrics
        if self.distributed.is_main:
            self.metrics = MetricsLog(self.run_dir, tensorboard=config.tensorboard, wandb_project=config.wandb_project)
            self.metrics.truncate_after(self.step)
        self._pending: list[dict[str, Any]] = []
        # Known on every rank alike, unlike the checkpoint folder that only rank 0 writes.
        self._step_saved: int | None = (
            self.step if checkpoint is not None and checkpoint.name == ckpt.step_name(self.step) else None
        )
        self._smoothed_loss: float | None = None

    # ----- setup -----
    def _warn(self, message: str) -> None:
        if self.distributed.is_main:
            print(f"bakallm train: warning: {message}", file=sys.stderr)

    @staticmethod
    def _resume_config(config: TrainConfig, explicit: Mapping[str, str]) -> tuple[TrainConfig, dict[str, Any]]:
        """The saved run's arguments with the allowed changes, and the facts saved about its sources."""
        run_dir = Path(config.resume)
        if not (run_dir / ckpt.CHECKPOINTS_DIR).is_dir():
            raise UserError(
                f"{run_dir} holds no checkpoint to resume from; check the path or start a new run with --run-dir."
            )
        saved = ckpt.read_run_config(run_dir)["training"]
        facts = {name: saved.pop(name) for name in RUN_FACTS if name in saved}
        current = config.to_dict()
        for name in sorted(explicit.keys() - RESUMABLE_CHANGES - RELOCATABLE_ARGUMENTS):
            if current[name] != saved.get(name):
                raise UserError(
                    f"Cannot resume {run_dir}: {explicit[name]} is {current[name]!r} but the run used {saved.get(name)!r}; "
                    "drop it (a resumed run keeps its own arguments) or start a new run."
                )
        changes = explicit.keys() & (RESUMABLE_CHANGES | RELOCATABLE_ARGUMENTS)
        merged = {**saved, **{name: current[name] for name in changes}, "resume": str(run_dir), "run_dir": str(run_dir)}
        data = Path(str(merged["data"])).expanduser()
        if data.is_absolute() and not data.exists():
            raise UserError(
                f"The corpus of {run_dir}, {data}, is gone; pass --data with its new location (its content is checked)."
            )
        return train_config_from_values(merged), facts

    def _require_same_source(self, name: str, saved_fingerprint: str | None, fingerprint: str) -> None:
        """On resume, --data or --tokenizer may name another path, but only for the same content."""
        if saved_fingerprint is not None and saved_fingerprint != fingerprint:
            raise UserError(
                f"Cannot resume {self.run_dir}: the --{name} {getattr(self.config, name)} holds other content than the run was trained on; pass the original one."
            )

    def _load_initial_weights(self, source: str) -> None:
        source_run, checkpoint = ckpt.resolve_checkpoint(source)
        saved = ckpt.read_run_config(source_run)
        source_kind = kind_of_run(saved.get("training", {}))
        if source_kind.name != self.kind.name:
            raise UserError(
                f"Cannot start from {source}: it trained {source_kind.noun} and this run trains {self.kind.noun}; start from a run of the same kind."
            )
        changed = self.kind.load_start_weights(self.model, saved["model"], checkpoint, source)
        if changed and self.distributed.is_main:
            print(
                f"bakallm train: starting from {source} with model fields changed: {', '.join(changed)}",
                file=sys.stderr,
            )

    def _planned_steps(self) -> int:
        """Steps the run will take: --max-steps, or the steps the batcher really needs for --epochs
        (found by running its schedule on document lengths alone), whichever comes first."""
        if self.max_epochs is None:
            return self.config.max_steps
        batches = self.batcher.count_batches()
        warning = padding_warning(self.batcher, batches)
        if warning is not None and self.distributed.is_main:
            print(f"bakallm train: warning: {warning}", file=sys.stderr)
        steps_of_epochs = math.ceil(batches / self.config.grad_accum)
        return min(steps_of_epochs, self.config.max_steps or steps_of_epochs)

    @property
    def max_epochs(self) -> int | None:
        if self.config.epochs is not None:
            return self.config.epochs
        return None if self.config.max_steps is not None else 1

    # ----- checkpoints -----
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "epochs_done": self.epochs_done,
            "tokens_seen": self.tokens_seen,
            "positions_seen": self.positions_seen,
            "epoch_progress": self.epoch_progress,
            "elapsed": self.elapsed,
            "world_size": self.distributed.world_size,
            "batcher": self.batcher.state_dict(),
            "schedule": self.schedule.segments_as_lists(),
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
        path = ckpt.save_checkpoint(
            self.run_dir,
            name or ckpt.step_name(self.step),
            ckpt.savable_weights(self.model, weights),
            optimizer_state,
            self._trainer_state(),
            recurrent,
            {f"rank{rank}": state for rank, state in enumerate(rng_states)},
            self.config.keep_last,
            write_extras=lambda folder: self.kind.save_extras(self.model, folder, weights),
        )
        return path

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
        self.skipped_steps = trainer_state.get("skipped_steps", 0)
        self.epochs_done = trainer_state["epochs_done"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.positions_seen = trainer_state.get("positions_seen", 0)
        self.epoch_progress = trainer_state.get("epoch_progress", self.epoch_progress)
        self.elapsed = trainer_state["elapsed"]
        if "schedule" in trainer_state:
            self.schedule = self.schedule.with_segments(trainer_state["schedule"])
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
        state, reset = (self.state, batch.reset.to(device, non_blocking=True)) if self.carry_state else (None, None)
        with self._autocast():
            output = self.forward_model(
                input_ids, state=state, reset=reset if state is not None else None, targets=targets, return_logits=False
            )
        (output.loss * weight).backward()
        if self.carry_state:
            self.state = output.state.detach()
        return output.loss.detach() * batch.n_targets

    def train_step(self) -> list[Batch]:
        """One optimizer step over up to --grad-accum micro-batches; none (and no step) once the data has ended."""
        config = self.config
        started = time.perf_counter()
        self.model.train()
        batches = [
            batch for batch in (self.batcher.next_batch() for _ in range(config.grad_accum)) if batch is not None
        ]
        if not batches:
            return []
        n_targets = sum(
            batch.total_targets for batch in batches
        )  # over all ranks' rows: every rank knows the global batch
        n_inputs = sum(batch.total_inputs for batch in batches)  # tokens read, scored or not
        n_positions = sum(batch.targets.numel() for batch in batches) * self.distributed.world_size
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
        lr = self.schedule.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # One host synchronisation per step, so that non-finite gradients never reach the weights. The
        # norm is the all-reduced one: every rank takes the same decision.
        if bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self._skip_step(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_inputs
        self.positions_seen += n_positions
        for name, value in (("steps", 1), ("positions", n_positions), ("targets", n_inputs)):
            self.epoch_progress[name] += value
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        self._pending.append(
            {
                "step": self.step,
                "epoch": batches[-1].epoch,
                "tokens": self.tokens_seen,
                "loss": loss_sum / max(n_targets, 1),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": n_inputs / seconds,
                "time": self.elapsed,
                "padding": 1 - n_inputs / n_positions,
            }
        )
        return batches

    def _skip_step(self, grad_norm: torch.Tensor) -> None:
        """The policy for a step whose gradients are not finite (docs/training.md): no update, the
        carried state started afresh (it may hold the overflow), counted; after --max-skipped-steps
        such steps in a row the run stops, its weights never touched by them."""
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self.state = None
        first = self.step + 2 - self.skipped_in_a_row
        if self.skipped_in_a_row >= self.config.max_skipped_steps:
            latest = ckpt.latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint, {latest.name}, is kept" if latest else "no checkpoint had been saved yet"
            raise UserError(
                f"The gradients were not finite (norm {float(grad_norm)}) in {self.skipped_in_a_row} steps in a row ({first}-{self.step + 1}), "
                f"which were skipped; {kept}. Lower --lr, try --precision float32 or check the data, then resume."
            )
        self._warn(
            f"step {self.step + 1}: the gradients are not finite (norm {float(grad_norm)}); step skipped, state reset "
            f"({self.skipped_steps} skipped in all)"
        )

    def _flush_metrics(self) -> list[dict[str, Any]]:
        """Writes pending step metrics and returns them; the one host synchronisation, so done only every log_every steps."""
        if not self._pending:
            return []
        # Each rank's loss is its own token losses over all ranks' targets: their sum is the step's loss.
        losses = (
            self.distributed.sum(torch.stack([torch.as_tensor(entry["loss"]) for entry in self._pending]).float())
            .cpu()
            .tolist()
        )
        norms = torch.stack([torch.as_tensor(entry["grad_norm"]) for entry in self._pending]).float().cpu().tolist()
        logged = []
        for entry, loss, norm in zip(self._pending, losses, norms):
            logged.append({**entry, "loss": loss, "grad_norm": norm})
            if self.metrics is not None:
                self.metrics.log_step(**logged[-1])
            if math.isfinite(loss):  # a skipped step's loss says nothing about the weights
                self._smoothed_loss = loss if self._smoothed_loss is None else 0.95 * self._smoothed_loss + 0.05 * loss
        self._pending = []
        return logged

    def evaluate(self) -> dict[str, float]:
        # Every rank evaluates the whole corpus (FSDP2 needs all ranks in each forward); rank 0 logs.
        n_ctx, stride = self.kind.reading(self.config.eval_n_ctx, reach=self.config.train_ctx)
        settings = EvalSettings(
            n_ctx=n_ctx,
            stride=stride,
            batch_size=self.config.batch_size,
            device=self.device,
            autocast=self.autocast_dtype,
        )
        self.model.eval()
        try:
            result = self.kind.evaluate(self.model, self.eval_corpus, settings)
        finally:
            self.model.train()
        if self.metrics is not None:
            self.metrics.log_eval(
                step=self.step,
                tokens=self.tokens_seen,
                loss=result.loss,
                ppl=result.ppl,
                bpb=result.bpb,
                data=self.config.eval_data,
            )
        return {"loss": result.loss, "ppl": result.ppl, "bpb": result.bpb}

    def train(self) -> dict[str, Any]:
        """Trains to the end of the run, or until the first SIGINT/SIGTERM (then `summary["interrupted"]`)."""
        config = self.config
        report = ProgressReport(
            self.planned_steps,
            self.step,
            show_bar=config.progress and sys.stdout.isatty(),
            enabled=self.distributed.is_main,
        )
        last_eval: dict[str, float] | None = None
        interrupt = GracefulInterrupt("finishing this step, then saving a checkpoint")
        report.message(self.startup_summary())
        try:
            with interrupt:
                while not self._finished() and not interrupt.requested:
                    batches = self.train_step()
                    if not batches:
                        break
                    report.step_done()
                    if self.step % config.log_every == 0:
                        self._report(report, batches[-1])
                    for _ in range(sum(batch.epochs_ended for batch in batches)):
                        self._end_epoch(report)
                    if config.eval_every and self.step % config.eval_every == 0:
                        last_eval = self.evaluate()
                    if self.step % config.save_every == 0:
                        self.save()
                self._flush_metrics()
                if self._step_saved != self.step:  # known on every rank alike, unlike the folder only rank 0 writes
                    self.save()
            if interrupt.requested:
                report.message(
                    f"Interrupted: saved step {self.step}; continue with `bakallm train --resume {self.run_dir}`."
                )
            elif self.eval_corpus is not None and not (config.eval_every and self.step % config.eval_every == 0):
                last_eval = self.evaluate()
        finally:
            report.close()
            if self.metrics is not None:
                self.metrics.close()
            if self._lock is not None:
                self._lock.release()
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "epochs_done": self.epochs_done,
            "tokens": self.tokens_seen,
            "loss": self._smoothed_loss,
            "padding": 1 - self.tokens_seen / max(self.positions_seen, 1),
        }
        if interrupt.requested:
            summary["interrupted"] = True
        if last_eval:
            summary["eval_loss"] = last_eval["loss"]
        return summary

    def startup_summary(self) -> str:
        """What this run is about to do, in a few lines: the model, where it runs, the data, how much
        of it the planned steps cover, the learning rate and where the run is saved."""
        config = self.config
        counts = self.model.num_parameters()
        kind = self.kind.describe(config.to_dict())
        precision = {"pure-bfloat16": "pure bfloat16"}.get(config.precision) or (
            "bfloat16 autocast" if self.autocast_dtype is not None else "float32"
        )
        threads = (
            f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
            if self.device.type == "cpu"
            else ""
        )
        ranks = f" x {self.distributed.world_size} ranks" if self.distributed.world_size > 1 else ""
        tokens_per_step = self.global_rows * config.train_ctx * config.grad_accum
        steps_left = self.planned_steps - self.step
        share = self.planned_steps * tokens_per_step / max(self.corpus.n_tokens, 1)
        accumulation = f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else ""
        decay = self.config.decay_steps or self.planned_steps
        final_lr = config.lr * (1.0 if config.schedule == "constant" else config.min_lr_ratio)
        start = f"resuming from step {self.step}: {steps_left:,} steps to go" if self.step else "starting a new run"
        return "\n".join(
            [
                f"bakallm train: {start}",
                f"  model       {kind}: {counts['total'] / 1e6:.2f}M parameters, {counts['embedding'] / 1e6:.2f}M of them in embeddings "
                f"and {(counts['total'] - counts['embedding']) / 1e6:.2f}M in the rest",
                f"  device      {self.device.type}{ranks}, {precision}{threads}",
                f"  corpus      {self.corpus_name}: {len(self.corpus):,} documents, {self.corpus.n_tokens:,} tokens of {self.tokenizer.name} "
                f"({self.tokenizer.vocab_size:,} token types)",
                f"  plan        {self.planned_steps:,} steps of {self.global_rows} rows x {config.train_ctx:,} tokens{accumulation} = {tokens_per_step:,} tokens each: "
                f"{share:.2f} passes over the corpus",
                f"  lr          {config.schedule} from {config.lr:g} to {final_lr:g} over {decay:,} steps, after {config.warmup_steps} warm-up steps",
                f"  saved in    {self.run_dir} (every {config.save_every:,} steps and at the end, the last {config.keep_last} kept)",
            ]
        )

    def _report(self, report: ProgressReport, batch: Batch) -> None:
        logged = self._flush_metrics()
        padding = sum(entry["padding"] for entry in logged) / len(logged)
        tokens_per_s = sum(entry["tokens_per_s"] for entry in logged) / len(logged)
        report.log(
            self.step, batch.epoch + batch.epoch_fraction, self._smoothed_loss, logged[-1]["lr"], tokens_per_s, padding
        )

    def _end_epoch(self, report: ProgressReport) -> None:
        self.epochs_done += 1
        progress = self.epoch_progress
        report.epoch_done(self.epochs_done, progress["steps"], 1 - progress["targets"] / max(progress["positions"], 1))
        self.epoch_progress = {"steps": 0, "positions": 0, "targets": 0}
        self.save(f"epoch-{self.epochs_done}")

    def _finished(self) -> bool:
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            return True
        return self.batcher.exhausted
