"""Training arguments: one dataclass, filled from defaults, then a recipe file, then command-line flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bakallm.data import embedded
from bakallm.data.batching import MODES as BATCHING_MODES
from bakallm.errors import UserError
from bakallm.kernels import SCAN_BACKENDS
from bakallm.training.schedule import SCHEDULES

PRECISIONS = ("auto", "float32", "bfloat16", "pure-bfloat16")
WEIGHT_DECAY_SCOPES = ("matrices", "all")

# Arguments that may change when a run is resumed; every other one must match the saved run.
# batch_size may change only with the number of ranks, so that ranks x batch_size stays (the trainer checks it).
RESUMABLE_CHANGES = frozenset(
    {"batch_size", "fsdp", "max_steps", "epochs", "save_every", "keep_last", "eval_every", "eval_data", "eval_split", "log_every", "device",
     "compile", "activation_checkpointing", "max_skipped_steps", "scan", "progress", "tensorboard", "wandb_project", "resume", "run_dir", "cache_dir", "recipe", "threads", "new_decay"}
)
# Arguments that may name the same source at another path when a run is resumed: the trainer checks
# that the content is the same (the corpus and tokenizer fingerprints, the model config's fields).
RELOCATABLE = frozenset({"data", "tokenizer", "model_config"})
# Arguments that name local files or folders; stored resolved, so a run works from any directory.
PATH_ARGUMENTS = ("data", "tokenizer", "model_config", "eval_data", "cache_dir", "run_dir", "resume", "init_from", "recipe")
# Those that are always local paths, even before they exist (the others may be hub names).
ALWAYS_LOCAL = ("cache_dir", "run_dir", "resume")


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model_config: str | None = None  # JSON file of ModelConfig fields (of HF config fields with hf_config), applied over the preset
    hf_config: str | None = None  # train a transformers causal LM built from this config.json instead of a BakaLM
    data: str = embedded.TRAIN_CORPUS  # the books shipped with the package: a first run needs no download
    split: str = "train"
    tokenizer: str = embedded.TOKENIZER
    batch_size: int = 8
    train_ctx: int = 2048
    max_steps: int | None = None
    epochs: int | None = None  # default: 1 when max_steps is not given either
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None  # schedule length; default: the planned length of the run, fixed when it starts
    new_decay: bool = False  # on resume: warm up again and decay to the new end of the run
    schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    weight_decay_scope: str = "matrices"  # matrices: linear maps and embeddings; all: every parameter
    grad_clip: float = 0.5
    max_skipped_steps: int = 3  # a step with non-finite gradients is skipped; this many in a row stop the run
    grad_accum: int = 1
    seed: int = 0
    batching: str = "dynamic"
    shuffle: bool = False
    max_doc_tokens: int | None = None  # cut longer documents into independent pieces
    recall_every: int | None = None  # plant a recall fact about every N tokens of each document (data/recall.py)
    recall_max_distance: int = 1024  # tokens between a fact and its query, drawn log-uniformly from 0 to this
    recall_overlap: bool = True  # False: plant a fact only after the previous fact's query
    recall_lm_share: float = 1.0  # with recall facts: the share of ordinary tokens that are targets (answers always are)
    carry_state: bool = True
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass: less memory, more compute
    scan: str = "auto"  # selective scan backend, one of SCAN_BACKENDS
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None  # CPU threads; default: every CPU this process may use
    run_dir: str | None = None
    resume: str | None = None
    init_from: str | None = None
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 1
    eval_data: str | None = None
    eval_split: str = "validation"
    eval_every: int = 0
    eval_n_ctx: int = 1_048_576
    cache_dir: str | None = None
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None
    recipe: str | None = None

    def validate(self) -> None:
        for name in ("batch_size", "train_ctx", "grad_accum", "save_every", "keep_last", "log_every", "max_skipped_steps"):
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
            raise UserError(f"--weight-decay-scope must be one of {', '.join(WEIGHT_DECAY_SCOPES)}, got {self.weight_decay_scope!r}.")
        if self.hf_config and self.compile:
            raise UserError("--compile applies to our models only; drop it when training with --hf-config.")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.resume and self.init_from:
            raise UserError("--resume continues a run and --init-from starts a new one from its weights; pass only one of them.")
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainConfig field; defaults are None so a recipe's values are kept unless a flag is given.
    A help text that does not state its default in words gets the field's own default appended."""

    def add(flag: str, **options: Any) -> None:
        name = options.get("dest") or flag.lstrip("-").replace("-", "_")
        shown = default_text(name) if name in TRAIN_FIELDS else None
        if shown is not None and "(default" not in options.get("help", ""):
            options["help"] = f"{options['help']} {shown}"
        parser.add_argument(flag, **options)

    add("--recipe", help="YAML or JSON file of training arguments; flags given here override it")
    add("--preset", help="model preset: tiny, celp18, celp18-seed")
    add("--model-config", help="JSON file of model config fields, applied over the preset (HF config fields with --hf-config)")
    add("--hf-config", help="train a transformers causal LM built from this config.json (or its folder) instead of our model")
    add("--data", help=f"training corpus: a local .raw/.txt folder/.jsonl/.parquet path, wikitext-103, wikitext-2, or {embedded.TRAIN_CORPUS} (default: the books shipped with bakallm)")
    add("--split", help="corpus split for hub corpora")
    add("--tokenizer", help=f"tokenizer.json file or folder, hub name, 'bytes', or {embedded.TOKENIZER} (default: {embedded.TOKENIZER}, shipped with bakallm)")
    add("--batch-size", type=int, help="rows per step and rank, each streaming one document")
    add("--train-ctx", type=int, help="tokens per row and step; gradients flow through them")
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--epochs", type=int, help="stop after this many passes over the corpus (default 1 without --max-steps)")
    add("--lr", type=float, help="peak learning rate")
    add("--min-lr-ratio", type=float, help="final learning rate as a fraction of --lr for cosine/linear")
    add("--warmup-steps", type=int, help="linear warm-up steps")
    add("--decay-steps", type=int, help="steps over which the schedule decays, fixed when the run starts (default: --max-steps, or the steps --epochs takes)")
    add("--new-decay", action="store_true", default=None,
        help="with --resume and a longer run: warm up again from the current learning rate and decay to the new end (default: hold the final learning rate)")
    add("--schedule", choices=SCHEDULES, help="learning-rate schedule after warm-up")
    add("--beta1", type=float, help="AdamW beta1 (default 0.9)")
    add("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    add("--weight-decay", type=float, help="AdamW weight decay")
    add("--weight-decay-scope", choices=WEIGHT_DECAY_SCOPES, help="matrices: decay linear maps and embeddings only (default); all: every parameter")
    add("--grad-clip", type=float, help="clip the gradient norm to this value; 0 turns it off")
    add("--max-skipped-steps", type=int,
        help="a step whose gradients are not finite is skipped (no update, state reset); stop after this many in a row (default 3)")
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--seed", type=int, help="seed for weights and shuffling")
    add("--batching", choices=BATCHING_MODES, help="dynamic: refill each row when its document ends; static: wait for the whole batch; windows: a random window per row and step, state reset every step")
    add("--shuffle", action="store_true", default=None, help="shuffle documents each epoch (from --seed)")
    add("--max-doc-tokens", type=int, help="cut documents longer than this many tokens into independent pieces (default: never)")
    add("--recall-every", type=int, metavar="N",
        help="plant a fact ('The code of Mary Alden is 4 8 1 2 7.') about every N tokens of each document, and its query and answer "
        "some distance later, to teach the model to recall through its state (default: none; docs/recall.md)")
    add("--recall-max-distance", type=int, metavar="TOKENS", help="with --recall-every: the longest distance between a fact and its query")
    add("--no-recall-overlap", dest="recall_overlap", action="store_false", default=None,
        help="with --recall-every: plant a fact only after the previous fact's query, so that one fact at most waits (default: facts overlap)")
    add("--recall-lm-share", type=float, metavar="P",
        help="with --recall-every: score each ordinary token with probability P (answers always; a fact's random code never), "
        "so that answers weigh more and the output layer runs on fewer positions (default 1)")
    add("--no-carry-state", dest="carry_state", action="store_false", default=None, help="start every step from a fresh state (reference behaviour)")
    add("--compile", action="store_true", default=None, help="torch.compile each layer with static shapes")
    add("--activation-checkpointing", action="store_true", default=None,
        help="keep only each block's inputs for the backward pass and recompute the rest there: less memory for about a third more time")
    add("--scan", choices=SCAN_BACKENDS, help="selective scan backend; auto: triton on CUDA when it imports and passes its self-check, else the log-depth parallel scan on CUDA and the blocked scan elsewhere")
    add("--fsdp", action="store_true", default=None, help="under torchrun, shard the model per block with FSDP2 instead of replicating it with DDP")
    add(
        "--precision", choices=PRECISIONS,
        help="auto: float32 on CPU, bfloat16 autocast on CUDA; pure-bfloat16: weights and optimizer state in bfloat16 (meant for CUDA)",
    )
    add("--device", help="cpu, cuda, cuda:N or auto")
    add("--threads", type=int, help="CPU threads for PyTorch (default: the CPUs this process may use); on a busy machine try 1")
    add("--run-dir", help="where checkpoints, config and metrics go (default runs/DATE-TIME)")
    add("--resume", help="continue the run in this directory exactly where it stopped")
    add("--init-from", help="start a new run from the weights of this run directory or checkpoint")
    add("--save-every", type=int, help="save a checkpoint every N steps")
    add("--keep-last", type=int, help="step checkpoints to keep (default 3); epoch snapshots are always kept")
    add("--log-every", type=int, help="write metrics, and a text line when there is no progress bar, every N steps")
    add("--eval-data", help="corpus to evaluate on during training")
    add("--eval-split", help="split of --eval-data")
    add("--eval-every", type=int, help="evaluate every N steps (default 0: only at the end when --eval-data is given)")
    add("--eval-n-ctx", type=int, help="evaluation context: reset the state every N tokens")
    add("--cache-dir", help="token cache folder (default $BAKALLM_CACHE or ~/.cache/bakallm/tokens)")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="text lines instead of a progress bar (the default when stdout is not a terminal)")
    add("--tensorboard", action="store_true", default=None, help="also log to TensorBoard in the run directory")
    add("--wandb-project", help="also log to this Weights & Biases project")


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
        raise UserError(f"Unknown training argument(s) {', '.join(unknown)}; see `bakallm train --help` for the valid names.")
    return TrainConfig(**values)


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, str]]:
    """The merged config, and where each argument given explicitly came from: its flag, or the recipe."""
    given = {field.name: getattr(args, field.name) for field in fields(TrainConfig) if getattr(args, field.name, None) is not None}
    values = read_recipe(given["recipe"]) if "recipe" in given else {}
    origins = {name: f"the recipe {given['recipe']}'s {name}" for name in values}
    values.update(given)
    origins.update({name: "--" + name.replace("_", "-") for name in given})
    config = train_config_from_values(values)
    config.validate()
    return config, origins
