"""Document cache: what the document has said so far, carried in the recurrent state, and mixed
into the output distribution through learned gates.

    p(y) = w_0 softmax(logits)(y) + w_1 count(y) / count(all) + sum_c w_(c+1) count(s_c y) / count(s_c)

s_c is the run of the last c tokens read (c = 1 .. document_cache_order - 1), so the terms after
the first are the document's own bigram, trigram ... continuations: what followed s_c each time it
occurred before. The weights are a softmax over [0, gate_1, gate_(c+1) ...], each gate a linear
function of the position's final-normed hidden state, and each n-gram gate also of log(1 +
count(s_c)), so that a context seen often is trusted more; a context never seen gets weight 0.
Every count covers the tokens read so far in the document, the position's own input included
(never its target); no window boundary and no document length make the state forget.

The unigram term is the neural cache of Grave et al. (2017) in its simplest form. docs/quality.md
measured why it is here (Finding 7: at ~1M training tokens the models leave a document's
repetitions unused) and why the n-gram terms are (Finding 10: on books, the unigram cache helps
less the longer the history, because a whole book's counts drift towards ordinary word
frequencies, while the continuations of a context become more specific).

Only the gates learn from the mixture. The network trains on its own cross-entropy, and the gates
read its hidden state without sending gradient back: trained on the mixture's loss, a fresh
network gets ~1% of the gradient of every token the cache already predicts (early on, a
document's frequent words) and learns more slowly (Finding 9: +4.7% training loss at steps 41-55).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bakallm.model.state import RecurrentState

# sigmoid(-3) = 0.047: the gate starts near the weights that suited the diagnostic's fixed mixture (0.02-0.2).
INITIAL_GATE_BIAS = -3.0
# An n-gram term starts at a weight of about e^-2 of the softmax's for a context seen once, and
# grows with the context's count; the probe of Finding 10 liked ~0.2 each once a context is common.
INITIAL_NGRAM_GATE_BIAS = -2.0
INITIAL_NGRAM_COUNT_WEIGHT = 0.5
# Above every n-gram key (ModelConfig checks that vocab_size ** order fits below it).
PADDING_KEY = torch.iinfo(torch.int64).max
# The log-probabilities of terms that give a target nothing are raised to this before they are
# summed: exp() of it is 0 in float32, and, unlike -inf, it leaves finite gradients.
LOG_FLOOR = -1e4


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def run_keys(tokens: torch.Tensor, length: int, vocab_size: int) -> torch.Tensor:
    """The keys [B, L - length + 1] of the runs of `length` consecutive tokens in tokens [B, L]:
    each run read as a number in base vocab_size."""
    powers = vocab_size ** torch.arange(length - 1, -1, -1, device=tokens.device)
    return (tokens.unfold(1, length, 1) * powers).sum(-1)


def merge_ngrams(
    keys: torch.Tensor, counts: torch.Tensor, new_keys: torch.Tensor, new_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A table of sorted keys [B, P] and counts [B, P] plus one count of each valid key of
    new_keys [B, n]: sorted again, equal keys merged, as wide as its fullest row.

    Only the window's n keys are sorted; they are then merged into the table in one pass over it
    (binary searches, then each old entry moves right by the number of new keys inserted before
    it), so reading a window costs O(P + n log n), not a sort of the whole table: at 1M tokens
    the table holds about a million entries per context length."""
    batch, width = keys.shape
    old_keys = keys.masked_fill(counts == 0, PADDING_KEY)  # a zeroed (reset) row is all padding
    window_keys, _ = new_keys.masked_fill(~new_valid, PADDING_KEY).sort(1)
    starts = torch.ones_like(window_keys, dtype=torch.bool)
    starts[:, 1:] = window_keys[:, 1:] != window_keys[:, :-1]
    group = starts.cumsum(1) - 1
    # The window's distinct keys [B, n] (padding after them) and how often each occurred.
    unique_keys = torch.full_like(window_keys, PADDING_KEY).scatter_(1, group, window_keys)
    unique_counts = counts.new_zeros(window_keys.shape).scatter_add_(
        1, group, (window_keys != PADDING_KEY).to(counts.dtype)
    )
    present = unique_counts > 0
    position = torch.searchsorted(old_keys, unique_keys)  # width: after every old entry
    existing = position.clamp(max=width - 1)
    found = present & (old_keys.gather(1, existing) == unique_keys)
    merged_counts_old = counts.scatter_add(1, existing, torch.where(found, unique_counts, 0.0))
    inserted = present & ~found
    # An inserted key goes before the old entry at its search position, so never after a padding
    # entry: old entry i moves right by the number inserted at positions <= i.
    before = torch.zeros(batch, width + 1, dtype=torch.long, device=keys.device).scatter_add_(
        1, position, inserted.long()
    )
    old_target = torch.arange(width, device=keys.device) + before[:, :width].cumsum(1)
    new_target = position + inserted.long().cumsum(1) - 1
    dump = width + new_keys.shape[1]  # a last column that collects the window keys not inserted
    new_target = torch.where(inserted, new_target, dump)
    merged_keys = torch.full((batch, dump + 1), PADDING_KEY, dtype=keys.dtype, device=keys.device)
    merged_keys.scatter_(1, old_target, old_keys).scatter_(1, new_target, unique_keys)
    merged_counts = counts.new_zeros(batch, dump + 1)
    merged_counts.scatter_(1, old_target, merged_counts_old).scatter_(1, new_target, unique_counts)
    filled = max(1, int(((counts > 0).sum(1) + inserted.sum(1)).max()))
    return merged_keys[:, :filled].contiguous(), merged_counts[:, :filled].contiguous()


def lookup(keys: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The counts [B, n] of the keys queries [B, n] in the table (keys, counts) [B, P]; 0 if absent."""
    index = torch.searchsorted(keys, queries).clamp(max=keys.shape[1] - 1)
    return torch.where(keys.gather(1, index) == queries, counts.gather(1, index), 0.0)


class DocumentCache(nn.Module):
    def __init__(self, d_model: int, vocab_size: int, order: int = 1):
        super().__init__()
        self.vocab_size = vocab_size
        self.order = order
        # Plain parameters, not nn.Linear: the model's initialisation, which walks its Linear
        # modules drawing random numbers, then draws exactly what it draws without the cache.
        self.gate_weight = nn.Parameter(torch.zeros(d_model))
        self.gate_bias = nn.Parameter(torch.full((), INITIAL_GATE_BIAS))
        if order > 1:
            self.ngram_gate_weight = nn.Parameter(torch.zeros(order - 1, d_model))
            self.ngram_gate_bias = nn.Parameter(torch.full((order - 1,), INITIAL_NGRAM_GATE_BIAS))
            self.ngram_count_weight = nn.Parameter(torch.full((order - 1,), INITIAL_NGRAM_COUNT_WEIGHT))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate_weight.zero_()
            self.gate_bias.fill_(INITIAL_GATE_BIAS)
            if self.order > 1:
                self.ngram_gate_weight.zero_()
                self.ngram_gate_bias.fill_(INITIAL_NGRAM_GATE_BIAS)
                self.ngram_count_weight.fill_(INITIAL_NGRAM_COUNT_WEIGHT)

    def initial_state(self, batch_size: int, device: torch.device | str) -> dict[str, object]:
        """The RecurrentState fields of rows that have read nothing."""
        contexts = range(1, self.order)
        return {
            "token_counts": torch.zeros(batch_size, self.vocab_size, device=device),
            "ngram_keys": tuple(torch.zeros(batch_size, 1, dtype=torch.long, device=device) for _ in contexts),
            "ngram_counts": tuple(torch.zeros(batch_size, 1, device=device) for _ in contexts),
            "recent_tokens": torch.zeros(batch_size, self.order - 1, dtype=torch.long, device=device)
            if self.order > 1
            else None,
        }

    def read(self, state: RecurrentState, input_ids: torch.Tensor) -> RecurrentState:
        """The state after its rows read input_ids [B, n] (only the cache's fields change)."""
        token_counts = state.token_counts.scatter_add(
            1, input_ids, torch.ones(input_ids.shape, dtype=state.token_counts.dtype, device=input_ids.device)
        )
        if self.order == 1:
            return dataclasses.replace(state, token_counts=token_counts)
        tables = []
        for length, keys, counts in zip(range(1, self.order), state.ngram_keys, state.ngram_counts):
            contexts, valid = self._contexts(state, input_ids, length)
            tables.append(merge_ngrams(keys, counts, contexts[:, :-1] * self.vocab_size + input_ids, valid[:, :-1]))
        return dataclasses.replace(
            state,
            token_counts=token_counts,
            ngram_keys=tuple(keys for keys, _ in tables),
            ngram_counts=tuple(counts for _, counts in tables),
            recent_tokens=torch.cat((state.recent_tokens, input_ids), 1)[:, -(self.order - 1) :],
        )

    def _contexts(
        self, state: RecurrentState, input_ids: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys [B, n + 1] of the `length` tokens before each input m (m = n: after the last
        one), and whether the row had read that many tokens by then."""
        tokens = torch.cat((state.recent_tokens[:, state.recent_tokens.shape[1] - length :], input_ids), 1)
        read = state.token_counts.sum(1, keepdim=True) + torch.arange(input_ids.shape[1] + 1, device=input_ids.device)
        return run_keys(tokens, length, self.vocab_size), read >= length

    def _window_matches(
        self, state: RecurrentState, input_ids: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each position i of the window: the key [B, n] of the context it predicts from, whether
        it exists [B, n], and which inputs m <= i of the window followed the same context [B, n, n]."""
        contexts, valid = self._contexts(state, input_ids, length)
        query = contexts[:, 1:]
        causal = torch.ones(input_ids.shape[1], input_ids.shape[1], dtype=torch.bool, device=input_ids.device).tril()
        matches = (contexts[:, :-1].unsqueeze(1) == query.unsqueeze(2)) & causal & valid[:, :-1].unsqueeze(1)
        return query, valid[:, 1:], matches

    def target_mixture(
        self, hidden: torch.Tensor, before: RecurrentState, input_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `mixture` argument of kernels.cross_entropy.linear_cross_entropy for one window:
        the softmax's log-weight and the cache's weighted log-probability of each target, both
        [B * n], from hidden [B, n, d], the state before the window, its input ids and targets
        [B, n] (IGNORE_INDEX targets get any value: the loss skips them). Only the targets'
        counts are looked up, never a [n, V] table."""
        length = input_ids.shape[1]
        safe_targets = targets.clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        # Occurrences of each target among the inputs read so far: before the window, and in the
        # window up to and including the position (a [n, n] comparison per row, not [n, V] counts).
        in_window = ((safe_targets.unsqueeze(2) == input_ids.unsqueeze(1)) & causal).sum(2)
        read = before.token_counts.sum(1, keepdim=True) + torch.arange(
            1, length + 1, device=input_ids.device
        )  # by each position
        probabilities = [(before.token_counts.gather(1, safe_targets) + in_window) / read]
        context_counts = []
        for context_length, keys, counts in zip(range(1, self.order), before.ngram_keys, before.ngram_counts):
            query, valid, matches = self._window_matches(before, input_ids, context_length)
            low, high = self._spans(keys, query)
            cumulative = torch.nn.functional.pad(counts.cumsum(1), (1, 0))
            n_context = torch.where(valid, cumulative.gather(1, high) - cumulative.gather(1, low) + matches.sum(2), 0.0)
            followed_by_target = matches & (input_ids.unsqueeze(1) == safe_targets.unsqueeze(2))
            n_pair = torch.where(
                valid, lookup(keys, counts, query * self.vocab_size + safe_targets) + followed_by_target.sum(2), 0.0
            )
            probabilities.append(n_pair / n_context.clamp(min=1))
            context_counts.append(n_context)
        log_weights = self._log_weights(hidden, context_counts)
        terms = log_weights[..., 1:] + torch.stack(probabilities, -1).to(log_weights.dtype).log()
        return log_weights[..., 0].flatten(), terms.clamp(min=LOG_FLOOR).logsumexp(-1).flatten()

    def window_log_probs(
        self, hidden: torch.Tensor, logits: torch.Tensor, before: RecurrentState, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities [B, n, V] of the mixture at every position of a window, from hidden
        [B, n, d], the model's logits [B, n, V], the state before the window and its inputs [B, n]."""
        batch, length = input_ids.shape
        used = (before.token_counts > 0).any(0)
        used[input_ids.flatten()] = True
        columns = used.nonzero().squeeze(1)
        column_of_input = torch.searchsorted(columns, input_ids.contiguous())
        arrivals = before.token_counts.new_zeros(batch, length, len(columns)).scatter_(
            2, column_of_input.unsqueeze(2), 1.0
        )
        tables = [arrivals.cumsum_(1).add_(before.token_counts[:, columns].unsqueeze(1))]
        for context_length, keys, counts in zip(range(1, self.order), before.ngram_keys, before.ngram_counts):
            query, valid, matches = self._window_matches(before, input_ids, context_length)
            table = self._continuations(keys, counts, query, columns)
            row, position, earlier = matches.nonzero(as_tuple=True)
            table.index_put_(
                (row, position, column_of_input[row, earlier]), torch.ones_like(row, dtype=table.dtype), accumulate=True
            )
            tables.append(table * valid.unsqueeze(-1))
        return self._mixture(hidden, logits, columns, tables)

    def mix(self, hidden: torch.Tensor, logits: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """Log-probabilities [B, V] of the mixture for the token after everything `state` has read,
        from hidden [B, d] and the model's logits [B, V] there (incremental decoding)."""
        counts = state.token_counts
        columns = (counts > 0).any(0).nonzero().squeeze(1)
        read = counts.sum(1, keepdim=True)
        tables = [counts[:, columns]]
        for length, keys, table_counts in zip(range(1, self.order), state.ngram_keys, state.ngram_counts):
            query = run_keys(state.recent_tokens[:, state.recent_tokens.shape[1] - length :], length, self.vocab_size)
            tables.append(self._continuations(keys, table_counts, query, columns)[:, 0] * (read >= length))
        return self._mixture(hidden, logits, columns, tables)

    def _continuations(
        self, keys: torch.Tensor, counts: torch.Tensor, query: torch.Tensor, columns: torch.Tensor
    ) -> torch.Tensor:
        """How often each token of `columns` [K] followed the context query [B, n] in the table
        (keys, counts) [B, P]: [B, n, K]. The table's entries of a context are one sorted span."""
        batch, length = query.shape
        low, high = self._spans(keys, query)
        low, spans = low.flatten(), (high - low).flatten()
        owner = torch.repeat_interleave(torch.arange(batch * length, device=query.device), spans)
        entry = (
            low[owner]
            + torch.arange(len(owner), device=query.device)
            - torch.repeat_interleave(spans.cumsum(0) - spans, spans)
        )
        row = owner // length
        next_column = torch.searchsorted(columns, keys[row, entry] % self.vocab_size).clamp(max=len(columns) - 1)
        table = counts.new_zeros(batch * length, len(columns)).index_put_(
            (owner, next_column), counts[row, entry], accumulate=True
        )
        return table.view(batch, length, len(columns))

    def _spans(self, keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the entries of each context query [B, n] begin and end in the sorted keys [B, P]."""
        return torch.searchsorted(keys, query * self.vocab_size), torch.searchsorted(
            keys, (query + 1) * self.vocab_size
        )

    def _log_weights(self, hidden: torch.Tensor, context_counts: list[torch.Tensor]) -> torch.Tensor:
        """The log-weights [..., 2 + len(context_counts)] of the softmax, the unigram term and each
        n-gram term at each position of hidden [..., d] (final-normed, detached), given how often
        each position's contexts occurred before [...]."""
        hidden = at_least_float32(hidden.detach())
        gates = [hidden @ self.gate_weight.to(hidden.dtype) + self.gate_bias.to(hidden.dtype)]
        for c, n_context in enumerate(context_counts):
            n_context = n_context.to(hidden.dtype)
            gate = (
                hidden @ self.ngram_gate_weight[c].to(hidden.dtype)
                + self.ngram_count_weight[c] * n_context.log1p()
                + self.ngram_gate_bias[c]
            )
            gates.append(gate.masked_fill(n_context == 0, -torch.inf))
        return torch.stack([torch.zeros_like(gates[0]), *gates], -1).log_softmax(-1)

    def _mixture(
        self, hidden: torch.Tensor, logits: torch.Tensor, columns: torch.Tensor, tables: list[torch.Tensor]
    ) -> torch.Tensor:
        """The softmax's share of every token, plus the cache terms' shares of the tokens in
        `columns` [K] (those the document has used: elsewhere the cache gives nothing), from each
        term's counts [..., K] over them: the unigram counts, then each n-gram context's
        continuations (their sum is how often the context occurred). Working on those columns only
        keeps the cost near that of a log-softmax: over all V columns a window cost five times as
        much (docs/architecture.md)."""
        totals = [table.sum(-1) for table in tables]
        distributions = [table / total.clamp(min=1).unsqueeze(-1) for table, total in zip(tables, totals)]
        log_weights = self._log_weights(hidden, totals[1:])
        log_probs = at_least_float32(logits).log_softmax(-1) + log_weights[..., :1]
        cache = sum(
            weight.unsqueeze(-1) * distribution
            for weight, distribution in zip(log_weights[..., 1:].exp().unbind(-1), distributions)
        )
        model_part = log_probs.index_select(-1, columns)
        # where, not log(0) = -inf: that would make the gradient of the weights NaN.
        mixed = torch.where(
            cache > 0, torch.logaddexp(model_part, torch.where(cache > 0, cache, 1.0).log()), model_part
        )
        return log_probs.index_copy(-1, columns, mixed)
