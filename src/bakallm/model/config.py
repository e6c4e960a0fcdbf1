"""Model configuration: one typed dataclass, named presets, JSON round-trip, validation."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

VOCAB_PAD_MULTIPLE = 64

# Choices of the fields that can reproduce the reference ("seed") system; the first of each is ours.
NORMS = ("rmsnorm", "layernorm")
PAUSE_EMBEDDINGS = ("per_position", "shared")
PAUSE_PLACEMENTS = ("before_tokens", "window_slots")
MEMORY_LAYOUTS = ("learned_slots", "copy_memory")
MEMORY_READOUTS = ("write_slots", "first_slots")
INIT_SCHEMES = ("scaled_normal", "pytorch_default")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a `BakaLM`.

    Each window holds `window` tokens. It is laid out as
    `[n_memory read slots | window tokens with n_pauses pauses | n_memory write slots]`.
    The fields after `xl_cache` choose between our design (the defaults) and the reference
    system's; docs/architecture.md ("Where we differ") explains each.
    """

    vocab_size: int = 50277
    d_model: int = 768
    n_layers: int = 8
    n_heads: int = 12
    d_ff: int = 3072
    window: int = 512
    n_memory: int = 16
    n_pauses: int = 8
    elephant_a: float = 1.0
    elephant_d: float = 8.0
    mamba: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 0  # 0 means ceil(d_model / 16), as in Mamba-1
    # Mamba's step sizes start log-uniform in [mamba_dt_min, 0.1]. With Mamba-1's 1e-3 only ~4% of the
    # state keeps a tenth of itself across a 512-token window (docs/quality.md, Finding 5); a smaller
    # minimum starts more of it slow enough to carry.
    mamba_dt_min: float = 1e-3
    carry_mamba_state: bool = True
    # Carry the RMT memory from window to window; off, every window reads the learned initial memory
    # (with carry_mamba_state and xl_cache, it measures what each path of the state carries).
    carry_memory: bool = True
    # Mix the output with the counts of the document's tokens so far, through a learned gate
    # (model/document_cache.py; docs/quality.md, Finding 9).
    document_cache: bool = False
    # With the document cache, also mix in what followed each earlier run of the last k tokens, for
    # every k < document_cache_order (2: the bigram continuations, 3: bigrams and trigrams; Finding 10).
    document_cache_order: int = 1
    # Attend to the previous window's keys and values (Transformer-XL); off gives a windowed model.
    xl_cache: bool = True
    # Which layers have a Mamba mixer: every k-th one (layers k-1, 2k-1, ...); 1 means all.
    mamba_every: int = 1
    # rmsnorm, or layernorm (LayerNorm with bias) at the layer input, the Mamba input and the end.
    norm: str = "rmsnorm"
    # per_position: one learned vector per pause; shared: one vector used at every pause.
    pause_embedding: str = "per_position"
    # before_tokens: pause k precedes token k*s (s = window / n_pauses); window_slots: pause k sits
    # at slot k*s of the [pauses and tokens] body, i.e. before token k*(s-1).
    pause_placement: str = "before_tokens"
    # learned_slots: [learned initial memory or carried memory | tokens | learned write slots];
    # copy_memory: a fresh window is [tokens | learned write slots] (no read slots), later ones
    # [memory | tokens | a copy of the memory as write slots].
    memory_layout: str = "learned_slots"
    # write_slots: the next memory is the last layer's output at the write slots;
    # first_slots: at the first n_memory positions of the window.
    memory_readout: str = "write_slots"
    # scaled_normal: N(0, init_std), residual outputs scaled by 1/sqrt(2 n_layers);
    # pytorch_default: PyTorch's own (Linear kaiming-uniform, embeddings, pauses, memory N(0, 1)).
    init: str = "scaled_normal"
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived sizes -----
    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return self.mamba_dt_rank or math.ceil(self.d_model / 16)

    @property
    def pause_spacing(self) -> int:
        """Tokens between two pauses; a pause precedes tokens 0, spacing, 2*spacing, ..."""
        return self.window // self.n_pauses if self.n_pauses else self.window

    @property
    def pause_step(self) -> int:
        """Tokens between two pauses: pause k precedes token k * pause_step."""
        return self.pause_spacing - 1 if self.pause_placement == "window_slots" else self.pause_spacing

    def has_mamba(self, layer: int) -> bool:
        return self.mamba and layer % self.mamba_every == self.mamba_every - 1

    @property
    def layout_length(self) -> int:
        """Positions in one full window: read memory, tokens, pauses and write slots."""
        return 2 * self.n_memory + self.window + self.n_pauses

    @property
    def cache_length(self) -> int:
        """Positions of the previous window that attention sees: a full window, or none without the XL cache."""
        return self.layout_length if self.xl_cache else 0

    # ----- validation -----
    def validate(self) -> None:
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "window",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "mamba_every",
            "document_cache_order",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("n_memory", "n_pauses", "mamba_dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must divide d_model ({self.d_model}).")
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig head size d_model/n_heads ({self.head_dim}) must be even for rotary positions."
            )
        if self.n_pauses and self.window % self.n_pauses:
            raise ValueError(
                f"ModelConfig.window ({self.window}) must be divisible by n_pauses ({self.n_pauses}) so that pauses sit at fixed spacing."
            )
        for name, choices in (
            ("norm", NORMS),
            ("pause_embedding", PAUSE_EMBEDDINGS),
            ("pause_placement", PAUSE_PLACEMENTS),
            ("memory_layout", MEMORY_LAYOUTS),
            ("memory_readout", MEMORY_READOUTS),
            ("init", INIT_SCHEMES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}."
                )
        if self.n_pauses and self.pause_placement == "window_slots" and self.pause_spacing < 2:
            raise ValueError(
                "ModelConfig.pause_placement window_slots needs at least two tokens per pause (window >= 2 * n_pauses)."
            )
        if self.n_pauses > self.window:
            raise ValueError(f"ModelConfig.n_pauses ({self.n_pauses}) cannot exceed window ({self.window}).")
        if not 0 < self.mamba_dt_min < 0.1:
            raise ValueError(
                f"ModelConfig.mamba_dt_min must lie between 0 and 0.1 (the largest initial step size), got {self.mamba_dt_min!r}."
            )
        if not self.elephant_a > 0 or not self.elephant_d > 0:
            raise ValueError(
                f"ModelConfig.elephant_a and elephant_d must be positive, got {self.elephant_a} and {self.elephant_d}."
            )
        if not self.carry_memory and self.memory_layout != "learned_slots":
            raise ValueError(
                "ModelConfig.carry_memory false needs memory_layout learned_slots, whose fresh windows read the initial memory."
            )
        if self.document_cache_order > 1 and not self.document_cache:
            raise ValueError(
                "ModelConfig.document_cache_order above 1 needs document_cache: true; turn the cache on or set the order to 1."
            )
        if self.vocab_size**self.document_cache_order >= 2**63 - 1:
            raise ValueError(
                f"ModelConfig.document_cache_order {self.document_cache_order} is too high for a vocabulary of {self.vocab_size}: "
                "its n-grams would not fit in 64-bit keys; lower the order."
            )
        if self.rope_base <= 1 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("ModelConfig.rope_base must exceed 1, and norm_eps and init_std must be positive.")

    # ----- construction -----
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}.")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown ModelConfig field(s): {', '.join(unknown)}; valid fields are {', '.join(sorted(known))}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "ModelConfig":
        """Reads a config from a JSON string or from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"Model config file {path} does not exist; pass a JSON file or a JSON string.")
            text = path.read_text(encoding="utf-8")
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Model config is not valid JSON ({error.msg} at line {error.lineno}); fix the file."
            ) from None
        if not isinstance(values, dict):
            raise ValueError("Model config JSON must be an object of field names to values.")
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def differences(self, other: "ModelConfig") -> list[str]:
        """Names of the fields whose values differ from `other`'s."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# Field values over ModelConfig's defaults. "celp18" is the name the reference system's author gave
# his setup (8 layers, d_model 768, 12 heads, d_ff 3072, 16 memory tokens, 8 pauses, windows of 512):
# ModelConfig's defaults are that shape with our choices; "celp18-seed" is his system exactly;
# "tiny" is a small model for CPUs and tests.
PRESETS: dict[str, dict[str, Any]] = {
    "celp18": {},
    # The reference system (the "seed"), field by field: see docs/architecture.md.
    "celp18-seed": {
        "carry_mamba_state": False,
        "norm": "layernorm",
        "pause_embedding": "shared",
        "pause_placement": "window_slots",
        "memory_layout": "copy_memory",
        "memory_readout": "first_slots",
        "init": "pytorch_default",
    },
    "tiny": {
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "d_ff": 512,
        "window": 128,
        "n_memory": 8,
        "n_pauses": 4,
    },
}
