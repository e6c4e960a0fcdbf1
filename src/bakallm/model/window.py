"""The window runtime: how the model reads a batch of documents, one window at a time.

`WindowReader` holds the state committed by the last full window and the window in progress: per
layer its attention keys and values so far (model/attention.py: `KeyValueCache`) and its running
Mamba states (`LayerState`), and how many tokens of the window have been read. It offers two steps:

    read(input_ids)    a piece of tokens of the window: all of it in one go, or a part
    commit()           the window's write slots, then the RecurrentState the next window starts from

A forward call (`BakaLM.forward`) reads each window whole (`ends_window=True`: its write slots run
in the same pass) and commits it; incremental decoding (bakallm.generation) reads pieces, down to one
token, and commits when the window is full. Both go through the same layers with the same state, so
a document read token by token gives the forward call's logits and states.

A window of `W` tokens is laid out as `[read memory | tokens with pauses | write slots]` (see
docs/architecture.md); a piece holds its tokens and the pauses that fall before them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from bakallm.model.attention import KeyValueCache, xl_attention_mask
from bakallm.model.state import RecurrentState


class LayerState(NamedTuple):
    """One layer's part of a window in progress: its attention keys and values, and its Mamba
    convolution [B, d_inner, d_conv - 1] and SSM [B, d_inner, d_state] states after the positions
    read so far (None for a layer without Mamba)."""

    attention: KeyValueCache
    conv: torch.Tensor | None
    ssm: torch.Tensor | None


class WindowReader:
    """A batch of documents read up to the same position, window by window.

    `state` is the RecurrentState committed by the last full window (its document-cache counts, when
    the model has them, include every token read); `tokens_in_window` how many tokens of the window
    in progress have been read. `model` is a `BakaLM` (not imported here: the network imports this module).

    `fresh`: no row of `state` has a past (a state just made by `init_state`, which the caller
    knows without asking the device). The first window then leaves out the cache's past block,
    which every position would have to skip: read whole, it attends causally to its own positions
    only, which the attention kernel does in half the work of the masked [past | window] block.
    Its rotary positions start at 0 instead of after the past block; scores depend only on the
    distances between positions, so the results are those of the masked read, to rounding.
    """

    def __init__(self, model: Any, state: RecurrentState, fresh: bool = False):
        self.model = model
        self.config = model.config
        self.state = state
        self.fresh = fresh
        self.tokens_in_window = 0
        self._layers: list[LayerState] = []
        self._past_length = 0  # of the window in progress: the cache's past block (0 when fresh)
        self._positions = 0  # positions of the window's layout read so far (memory, pauses and tokens)
        self._mask: torch.Tensor | None = None  # the whole window's attention mask, when read in pieces
        self._every_row_has_past = False  # then a single position sees every key before it: no mask
        self._memory: torch.Tensor | None = None  # the last layer's output at the memory read-out, once it ran

    @property
    def window_full(self) -> bool:
        return self.tokens_in_window == self.config.window

    # ----- the two steps -----
    def read(
        self, input_ids: torch.Tensor, ends_window: bool = False, embedded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reads input_ids [B, n], the next tokens of the window in progress (n at most what is left
        of it); returns the last layer's output at them [B, n, d_model] (before the final norm).

        `ends_window`: these tokens are the whole window (or the last, partial one of a forward
        call); its write slots run in the same pass, and `commit` follows. `embedded`: the tokens'
        embeddings [B, n, d_model] when the caller has them (default: looked up here).
        """
        config, model = self.config, self.model
        length = input_ids.shape[1]
        if length > config.window - self.tokens_in_window:
            raise ValueError(
                f"{length} tokens do not fit in what is left of the window ({config.window - self.tokens_in_window})."
            )
        if ends_window and self.tokens_in_window:
            raise ValueError("ends_window reads a whole window in one piece; this window is already partly read.")
        body, token_positions = model.embed_window_tokens(input_ids, first=self.tokens_in_window, tokens=embedded)
        only_tokens = (
            body.shape[1] == length and self.tokens_in_window > 0
        )  # no pause, no slot: x holds just the tokens
        if self.tokens_in_window == 0:
            x, offset, hidden_keys = self._begin(body, ends_window)
            token_positions = token_positions + offset
        else:
            x, hidden_keys = body, None
        mask = self._attention_mask(x.shape[1], hidden_keys)
        x = self._run(x, mask)
        self.tokens_in_window += length
        if ends_window:
            n_memory = config.n_memory
            self._memory = x[:, :n_memory] if config.memory_readout == "first_slots" else x[:, x.shape[1] - n_memory :]
        if model.document_cache is not None:
            # The cache is not tied to windows: the state's counts grow with every token read.
            self.state = model.document_cache.read(self.state, input_ids)
        return x if only_tokens else x.index_select(1, token_positions)

    def commit(self) -> RecurrentState:
        """Ends the window in progress (running its write slots if they have not run) and returns
        the state it hands on: the last layer's output at the memory read-out (the write slots; or the
        seed's first slots), the window's keys and values per layer and the Mamba states after it."""
        config, model = self.config, self.model
        if not self._layers:
            raise ValueError("commit() needs a window in progress: read some tokens first.")
        memory = self._memory
        if memory is None:  # read in pieces (the write_slots read-out): the write slots run now
            # The dtype of the window's other inputs: the embedding's, as in a forward call.
            memory = model.write_slots.to(model.embed.weight.dtype).expand(self.state.batch_size, -1, -1)
            if config.n_memory:
                memory = self._run(memory, self._attention_mask(config.n_memory, None))
        keys, values = zip(*(layer.attention.window_key_values() for layer in self._layers))
        mamba = [layer for layer in self._layers if layer.conv is not None]
        # Contiguous float32 caches: the same strides and dtype in every window, so a compiled
        # block sees identical inputs and never recompiles. The document cache's fields pass through.
        self.state = dataclasses.replace(
            self.state,
            memory=memory.float(),
            keys=tuple(key[:, :, : config.cache_length].float().contiguous() for key in keys),
            values=tuple(value[:, :, : config.cache_length].float().contiguous() for value in values),
            conv=tuple(layer.conv.contiguous() for layer in mamba),
            ssm=tuple(layer.ssm.contiguous() for layer in mamba),
            has_past=torch.ones_like(self.state.has_past),
        )
        self.tokens_in_window, self._positions, self._layers, self._mask, self._memory = 0, 0, [], None, None
        self.fresh = False
        return self.state

    # ----- inside a window -----
    def _begin(self, body: torch.Tensor, ends_window: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Starts a window with its first piece: the piece's positions with the read memory before
        them (and the write slots after them with `ends_window`), the number of read slots, and the
        read slots some rows must not see (see `_memory_layout`)."""
        config, state = self.config, self.state
        capacity = None if ends_window else config.layout_length
        if not ends_window and (config.memory_layout != "learned_slots" or config.memory_readout != "write_slots"):
            raise ValueError(
                "Reading a window in pieces supports the learned_slots memory layout with the write_slots read-out (our default); "
                f"this model uses {config.memory_layout} with {config.memory_readout}, so score it with a forward call instead."
            )
        if config.carry_mamba_state:
            convs, ssms = iter(state.conv), iter(state.ssm)
        else:
            convs, ssms = iter(tuple(map(torch.zeros_like, state.conv))), iter(tuple(map(torch.zeros_like, state.ssm)))
        self._past_length = 0 if self.fresh or not state.keys else state.keys[0].shape[2]
        past = self._past_length
        self._layers = [
            LayerState(
                KeyValueCache(key[:, :, :past], value[:, :, :past], capacity),
                next(convs) if layer.mamba is not None else None,
                next(ssms) if layer.mamba is not None else None,
            )
            for layer, key, value in zip(self.model.layers, state.keys, state.values)
        ]
        if ends_window:
            return self._memory_layout(body)
        read = self._read_memory(body.dtype)
        # The whole window's mask, of which each piece takes its rows.
        self._mask = xl_attention_mask(state.has_past, past, config.layout_length)
        self._every_row_has_past = bool(state.has_past.all())  # one host synchronisation per window
        return torch.cat((read, body), dim=1), config.n_memory, None

    def _attention_mask(self, length: int, hidden_keys: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of the next `length` positions: [B, 1, length, past + positions so far + length],
        or None when each sees every key up to itself: one position in a window whose rows all have
        a past (what decoding reads), or a fresh state's first window read whole (causal)."""
        past = self._past_length
        if self._mask is not None:
            if length == 1 and self._every_row_has_past:
                return None
            start = self._positions
            return self._mask[:, :, start : start + length, : past + start + length]
        if self.fresh and hidden_keys is None:
            return None
        mask = xl_attention_mask(self.state.has_past, past, length, self._positions)
        return mask if hidden_keys is None else mask & ~hidden_keys

    def _run(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Positions x [B, L, d] of the window through every layer; the last layer's output."""
        cos, sin = self.model.rotary_cos, self.model.rotary_sin
        layers = self._layers
        for index, layer in enumerate(self.model.layers):
            x, layers[index] = layer(x, state=layers[index], mask=mask, cos=cos, sin=sin)
        self._positions += x.shape[1]
        return x

    def _read_memory(self, dtype: torch.dtype) -> torch.Tensor:
        """The first n_memory positions of a `learned_slots` window [B, M, d]: the carried memory,
        or the learned initial memory for rows without a past (and for every row when the memory is not carried)."""
        state, model = self.state, self.model
        batch = state.batch_size
        initial = model.initial_memory.to(dtype)
        if not self.config.carry_memory:
            return initial.expand(batch, -1, -1)
        return torch.where(state.has_past.view(batch, 1, 1), state.memory.to(dtype), initial)

    def _memory_layout(self, body: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """A whole window's input `[read slots | body | write slots]`, the number of read slots, and
        an attention mask [B, 1, L, L_past + L] of read slots hidden from their row (or None)."""
        state, config = self.state, self.config
        batch, dtype, n_memory = body.shape[0], body.dtype, config.n_memory
        has_past = state.has_past.view(batch, 1, 1)
        write = self.model.write_slots.to(dtype).expand(batch, -1, -1)
        if config.memory_layout == "learned_slots":
            return torch.cat((self._read_memory(dtype), body, write), dim=1), n_memory, None
        # The reference layout: a fresh window has no read slots, a later one reads the memory and
        # writes into a copy of it. Exact when all rows agree (one host synchronisation to check).
        memory = state.memory.to(dtype)
        if not bool(state.has_past.any()):
            return torch.cat((body, write), dim=1), 0, None
        if bool(state.has_past.all()):
            return torch.cat((memory, body, memory), dim=1), n_memory, None
        # Rows of both kinds share one call: fresh rows get zero read slots that none of their
        # positions but the slot itself attends to (see docs/architecture.md on this approximation).
        x = torch.cat((torch.where(has_past, memory, 0.0), body, torch.where(has_past, memory, write)), dim=1)
        length, past_length = x.shape[1], self._past_length
        key_positions = torch.arange(past_length + length, device=x.device)
        query_positions = torch.arange(length, device=x.device).view(-1, 1)
        hidden_slot = (
            (key_positions >= past_length)
            & (key_positions < past_length + n_memory)
            & (key_positions != query_positions + past_length)
        )
        return x, n_memory, hidden_slot & ~state.has_past.view(batch, 1, 1, 1)
