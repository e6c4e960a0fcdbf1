"""Training arguments: one dataclass, filled from defaults, then a recipe file, then command-line flags.

Each field carries what the command line and the resume rules need of it (`option`), so that a
new argument is one field: bakallm.commands.train derives the parser from them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bakallm.data import embedded
from bakallm.data.batching import MODES as BATCHING_MODES
from bakallm.errors import UserError
from bakallm.evaluation.settings import OUR_N_CTX
from bakallm.kernels import SCAN_BACKENDS
from bakallm.training.schedule import SCHEDULES

PRECISIONS = ("auto", "float32", "bfloat16", "pure-bfloat16")
WEIGHT_DECAY_SCOPES = ("matrices", "all")

# How an argument behaves when a run is resumed: FIXED ones must match the saved run; MAY_CHANGE
# ones may change (batch_size only with the number of ranks, so that ranks x batch_size stays: the
# trainer checks it); RELOCATABLE ones may name the same source at another path (the trainer
# checks that the content is the same: the corpus and tokenizer fingerprints, the model's fields).
FIXED, MAY_CHANGE, RELOCATABLE = "fixed", "may change", "relocatable"


def option(
    default: Any,
    help: str | None = None,
    *,
    flag: str | None = None,
    on_resume: str = FIXED,
    path: str | None = None,
    shared: bool = False,
    **parser_options: Any,
) -> Any:
    """A TrainConfig field and everything `bakallm train`'s parser and the resume rules need of it.

    flag: the command-line flag (default --field-name; a switch that turns a True default off is
    --no-...); path: "local" for a local path even before it exists, "local or hub" for a path or a
    hub name (stored resolved when it exists locally); shared: a flag every command defines alike
    (bakallm.commands.options), with no help of its own here; parser_options: choices, metavar.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "on_resume": on_resume,
        "path": path,
        "shared": shared,
        "parser_options": parser_options,
    }
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    preset: str = option("tiny", help="model preset: tiny, celp18, celp18-seed")
    model_config: str | None = option(
        None,
        help="JSON file of model config fields, applied over the preset (HF config fields with --hf-config)",
        on_resume=RELOCATABLE,
        path="local or hub",
    )
    hf_config: str | None = option(
        None, help="train a transformers causal LM built from this config.json (or its folder) instead of our model"
    )
    data: str = option(
        embedded.TRAIN_CORPUS,
        help=f"training corpus: a local .raw/.txt folder/.jsonl/.parquet path, wikitext-103, wikitext-2, or {embedded.TRAIN_CORPUS} (default: the books shipped with bakallm)",
        on_resume=RELOCATABLE,
        path="local or hub",
    )
    split: str = option("train", help="corpus split for hub corpora")
    tokenizer: str = option(embedded.TOKENIZER, on_resume=RELOCATABLE, path="local or hub", shared=True)
    batch_size: int = option(8, help="rows per step and rank, each streaming one document", on_resume=MAY_CHANGE)
    train_ctx: int = option(2048, help="tokens per row and step; gradients flow through them")
    max_steps: int | None = option(None, help="stop after this many optimizer steps", on_resume=MAY_CHANGE)
    epochs: int | None = option(
        None, help="stop after this many passes over the corpus (default 1 without --max-steps)", on_resume=MAY_CHANGE
    )
    lr: float = option(6e-4, help="peak learning rate")
    min_lr_ratio: float = option(0.1, help="final learning rate as a fraction of --lr for cosine/linear")
    warmup_steps: int = option(100, help="linear warm-up steps")
    decay_steps: int | None = option(
        None,
        help="steps over which the schedule decays, fixed when the run starts (default: --max-steps, or the steps --epochs takes)",
    )
    new_decay: bool = option(
        False,
        help="with --resume and a longer run: warm up again from the current learning rate and decay to the new end (default: hold the final learning rate)",
        on_resume=MAY_CHANGE,
    )
    schedule: str = option("cosine", help="learning-rate schedule after warm-up", choices=SCHEDULES)
    beta1: float = option(0.9, help="AdamW beta1")
    beta2: float = option(0.95, help="AdamW beta2")
    weight_decay: float = option(0.1, help="AdamW weight decay")
    weight_decay_scope: str = option(
        "matrices",
        help="matrices: decay linear maps and embeddings only (default); all: every parameter",
        choices=WEIGHT_DECAY_SCOPES,
    )
    grad_clip: float = option(0.5, help="clip the gradient norm to this value; 0 turns it off")
    max_skipped_steps: int = option(
        3,
        help="a step whose gradients are not finite is skipped (no update, state reset); stop after this many in a row",
        on_resume=MAY_CHANGE,
    )
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    seed: int = option(0, help="seed for weights and shuffling")
    batching: str = option(
        "dynamic",
        help="dynamic: refill each row when its document ends; static: wait for the whole batch; windows: a random window per row and step, state reset every step",
        choices=BATCHING_MODES,
    )
    shuffle: bool = option(False, help="shuffle documents each epoch (from --seed)")
    max_doc_tokens: int | None = option(
        None, help="cut documents longer than this many tokens into independent pieces (default: never)"
    )
    recall_every: int | None = option(
        None,
        help="plant a fact ('The code of Mary Alden is 4 8 1 2 7.') about every N tokens of each document, and its query and answer "
        "some distance later, to teach the model to recall through its state (default: none; docs/recall.md)",
        metavar="N",
    )
    recall_max_distance: int = option(
        1024, help="with --recall-every: the longest distance between a fact and its query", metavar="TOKENS"
    )
    recall_overlap: bool = option(
        True,
        help="with --recall-every: plant a fact only after the previous fact's query, so that one fact at most waits (default: facts overlap)",
        flag="--no-recall-overlap",
    )
    recall_lm_share: float = option(
        1.0,
        help="with --recall-every: score each ordinary token with probability P (answers always; a fact's random code never), "
        "so that answers weigh more and the output layer runs on fewer positions",
        metavar="P",
    )
    carry_state: bool = option(
        True, help="start every step from a fresh state (reference behaviour)", flag="--no-carry-state"
    )
    compile: bool = option(False, help="torch.compile each layer with static shapes", on_resume=MAY_CHANGE)
    activation_checkpointing: bool = option(
        False,
        help="keep only each block's inputs for the backward pass and recompute the rest there: less memory for about a third more time",
        on_resume=MAY_CHANGE,
    )
    scan: str = option("auto", choices=SCAN_BACKENDS, on_resume=MAY_CHANGE, shared=True)
    keep_host_memory: bool = option(
        True,
        help="on a CPU, glibc keeps freed memory in the process for the next step instead of mapping large blocks afresh "
        "(faster steps, a little more peak memory: docs/performance.md); this turns that off",
        flag="--no-keep-host-memory",
        on_resume=MAY_CHANGE,
    )
    fsdp: bool = option(
        False,
        help="under torchrun, shard the model per block with FSDP2 instead of replicating it with DDP",
        on_resume=MAY_CHANGE,
    )
    precision: str = option(
        "auto",
        help="auto: float32 on CPU, bfloat16 autocast on CUDA; pure-bfloat16: weights and optimizer state in bfloat16 (meant for CUDA)",
        choices=PRECISIONS,
    )
    device: str = option("auto", on_resume=MAY_CHANGE, shared=True)
    threads: int | None = option(None, on_resume=MAY_CHANGE, shared=True)
    run_dir: str | None = option(
        None,
        help="where checkpoints, config and metrics go (default runs/DATE-TIME)",
        on_resume=MAY_CHANGE,
        path="local",
    )
    resume: str | None = option(
        None, help="continue the run in this directory exactly where it stopped", on_resume=MAY_CHANGE, path="local"
    )
    init_from: str | None = option(
        None, help="start a new run from the weights of this run directory or checkpoint", path="local or hub"
    )
    save_every: int = option(500, help="save a checkpoint every N steps", on_resume=MAY_CHANGE)
    keep_last: int = option(3, help="step checkpoints to keep; epoch snapshots are always kept", on_resume=MAY_CHANGE)
    log_every: int = option(
        1, help="write metrics, and a text line when there is no progress bar, every N steps", on_resume=MAY_CHANGE
    )
    eval_data: str | None = option(
        None, help="corpus to evaluate on during training", on_resume=MAY_CHANGE, path="local or hub"
    )
    eval_split: str = option("validation", help="split of --eval-data", on_resume=MAY_CHANGE)
    eval_every: int = option(
        0, help="evaluate every N steps (default 0: only at the end when --eval-data is given)", on_resume=MAY_CHANGE
    )
    eval_n_ctx: int = option(OUR_N_CTX, help="evaluation context: reset the state every N tokens")
    cache_dir: str | None = option(None, on_resume=MAY_CHANGE, path="local", shared=True)
    progress: bool = option(True, on_resume=MAY_CHANGE, flag="--no-progress", shared=True)
    tensorboard: bool = option(False, help="also log to TensorBoard in the run directory", on_resume=MAY_CHANGE)
    wandb_project: str | None = option(None, help="also log to this Weights & Biases project", on_resume=MAY_CHANGE)
    recipe: str | None = option(
        None,
        help="YAML or JSON file of training arguments; flags given here override it",
        on_resume=MAY_CHANGE,
        path="local or hub",
    )

    def validate(self) -> None:
        for name in (
            "batch_size",
            "train_ctx",
            "grad_accum",
            "save_every",
            "keep_last",
            "log_every",
            "max_skipped_steps",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_steps", "epochs", "decay_steps", "max_doc_tokens", "threads", "recall_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        if not 0 < self.recall_lm_share <= 1:
            raise UserError(f"--recall-lm-share must lie in (0, 1], got {self.recall_lm_share}.")
        if self.recall_max_distance < 0:
            raise UserError(f"--recall-max-distance must be at least 0, got {self.recall_max_distance}.")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}.")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.batching not in BATCHING_MODES:
            raise UserError(f"--batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}.")
        if self.scan not in SCAN_BACKENDS:
            raise UserError(f"--scan must be one of {', '.join(SCAN_BACKENDS)}, got {self.scan!r}.")
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise UserError(
                f"--weight-decay-scope must be one of {', '.join(WEIGHT_DECAY_SCOPES)}, got {self.weight_decay_scope!r}."
            )
        if self.hf_config and self.compile:
            raise UserError("--compile applies to our models only; drop it when training with --hf-config.")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.resume and self.init_from:
            raise UserError(
                "--resume continues a run and --init-from starts a new one from its weights; pass only one of them."
            )
        if self.new_decay and not self.resume:
            raise UserError("--new-decay starts a new decay when a run is resumed; pass it with --resume.")
        if self.eval_every and not self.eval_data:
            raise UserError("--eval-every needs --eval-data, the corpus to evaluate on.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_resolved_paths(self) -> TrainConfig:
        """The same arguments with local paths made absolute; hub names and 'bytes' stay as given."""
        values = self.to_dict()
        for name in PATH_ARGUMENTS:
            values[name] = resolve_path_argument(values[name], always_local=name in ALWAYS_LOCAL)
        return TrainConfig(**values)


TRAIN_FIELDS = frozenset(field.name for field in fields(TrainConfig))
RESUMABLE_CHANGES = frozenset(field.name for field in fields(TrainConfig) if field.metadata["on_resume"] == MAY_CHANGE)
RELOCATABLE_ARGUMENTS = frozenset(
    field.name for field in fields(TrainConfig) if field.metadata["on_resume"] == RELOCATABLE
)
# Arguments that name local files or folders; stored resolved, so a run works from any directory.
PATH_ARGUMENTS = tuple(field.name for field in fields(TrainConfig) if field.metadata["path"] is not None)
ALWAYS_LOCAL = tuple(field.name for field in fields(TrainConfig) if field.metadata["path"] == "local")


def resolve_path_argument(value: str | None, always_local: bool = False) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if always_local or path.exists() else value


def default_text(name: str) -> str | None:
    """How a flag's help shows the default of TrainConfig field `name`: "(default 8)", or None for a
    field without a plain default (None, a switch, or one the help explains in words)."""
    value = next(field.default for field in fields(TrainConfig) if field.name == name)
    if value is None or isinstance(value, bool):
        return None
    return f"(default {value:g})" if isinstance(value, float) else f"(default {value})"


def read_recipe(path: str, kind: str = "Recipe file", contents: str = "training arguments") -> dict[str, Any]:
    """The mapping in a YAML or JSON file; errors name it as `kind` (a study file is read the same way)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{kind} {file} does not exist; pass a YAML or JSON file of {contents}.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:  # yaml and json raise different types; both mean a malformed file
        raise UserError(f"{kind} {file} cannot be parsed ({str(error).splitlines()[0]}); fix its syntax.") from None
    if not isinstance(values, dict):
        raise UserError(f"{kind} {file} must map names to values.")
    return {key.replace("-", "_"): value for key, value in values.items()}


def train_config_from_values(values: dict[str, Any]) -> TrainConfig:
    known = {field.name for field in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"Unknown training argument(s) {', '.join(unknown)}; see `bakallm train --help` for the valid names."
        )
    return TrainConfig(**values)


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, str]]:
    """The merged config, and where each argument given explicitly came from: its flag, or the recipe."""
    given = {
        field.name: getattr(args, field.name)
        for field in fields(TrainConfig)
        if getattr(args, field.name, None) is not None
    }
    values = read_recipe(given["recipe"]) if "recipe" in given else {}
    origins = {name: f"the recipe {given['recipe']}'s {name}" for name in values}
    values.update(given)
    origins.update({name: "--" + name.replace("_", "-") for name in given})
    config = train_config_from_values(values)
    config.validate()
    return config, origins
