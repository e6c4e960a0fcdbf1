"""Document cache: how often each token has occurred so far in the document, carried in the
recurrent state, and mixed into the output distribution through a learned gate.

    p(y) = (1 - g) softmax(logits)(y) + g count(y) / count(all),   g = sigmoid(w . h + b)

h is the final-normed hidden state of the position, and the counts cover every token read so far
in the document, the position's own input included (never its target). It is the unigram form of
the neural cache of Grave et al. (2017): a state of vocab_size counts per row that no window
boundary and no document length make it forget. docs/quality.md (Finding 7) measured why it is
here: at ~1M training tokens the models leave a document's repetitions unused, and a cache of the
tokens before a window lowered every checkpoint's loss by 1.5-2.8%.

Only the gate learns from the mixture. The network trains on its own cross-entropy, and the gate
reads its hidden state without sending gradient back: trained on the mixture's loss, a fresh
network gets ~1% of the gradient of every token the cache already predicts (early on, a
document's frequent words) and learns more slowly (Finding 9: +4.7% training loss at steps 41-55).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# sigmoid(-3) = 0.047: the gate starts near the weights that suited the diagnostic's fixed mixture (0.02-0.2).
INITIAL_GATE_BIAS = -3.0


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class DocumentCache(nn.Module):
    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        # Plain parameters, not an nn.Linear: the model's initialisation, which walks its Linear
        # modules drawing random numbers, then draws exactly what it draws without the cache.
        self.gate_weight = nn.Parameter(torch.zeros(d_model))
        self.gate_bias = nn.Parameter(torch.full((), INITIAL_GATE_BIAS))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate_weight.zero_()
            self.gate_bias.fill_(INITIAL_GATE_BIAS)

    def initial_counts(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(batch_size, self.vocab_size, device=device)

    @staticmethod
    def count(counts: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """counts [B, V] plus the tokens of input_ids [B, n]."""
        return counts.scatter_add(1, input_ids, torch.ones(input_ids.shape, dtype=counts.dtype, device=counts.device))

    def _log_weights(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log(1 - g) and log(g) at each position of hidden [..., d] (final-normed), in float32 at least."""
        gate = at_least_float32(hidden.detach() @ self.gate_weight.to(hidden.dtype) + self.gate_bias.to(hidden.dtype))
        return F.logsigmoid(-gate), F.logsigmoid(gate)

    def target_mixture(
        self, hidden: torch.Tensor, counts_before: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `mixture` argument of kernels.cross_entropy.linear_cross_entropy for one window:
        the softmax's log-weight and the cache's weighted log-probability of each target, both
        [B * n], from hidden [B, n, d], the counts before the window [B, V], its input ids and
        targets [B, n] (IGNORE_INDEX targets get any value: the loss skips them)."""
        length = input_ids.shape[1]
        safe_targets = targets.clamp(min=0)
        # Occurrences of each target among the inputs read so far: before the window, and in the
        # window up to and including the position (a [n, n] comparison per row, not [n, V] counts).
        earlier = counts_before.gather(1, safe_targets)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        in_window = ((safe_targets.unsqueeze(2) == input_ids.unsqueeze(1)) & causal).sum(2)
        cache_log_prob = (earlier + in_window).log() - self._totals(counts_before, length).log()
        model_log_weight, cache_log_weight = self._log_weights(hidden)
        return model_log_weight.flatten(), (cache_log_weight + cache_log_prob).flatten()

    def mix(self, hidden: torch.Tensor, logits: torch.Tensor, seen_counts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [..., V] of the mixture, from hidden [..., d], the model's logits
        [..., V] and the counts of the tokens read up to each position [..., V]. A loss on these
        sends the mixture's gradient into the softmax; training scores `target_mixture` instead."""
        columns = (seen_counts > 0).reshape(-1, seen_counts.shape[-1]).any(0).nonzero().squeeze(1)
        return self._mixture(hidden, logits, columns, seen_counts[..., columns], seen_counts.sum(-1))

    def window_log_probs(
        self, hidden: torch.Tensor, logits: torch.Tensor, counts_before: torch.Tensor, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """`mix` at every position of a window [B, n], the counts growing along it."""
        batch, length = input_ids.shape
        used = (counts_before > 0).any(0)
        used[input_ids.flatten()] = True
        columns = used.nonzero().squeeze(1)
        column_of_input = torch.searchsorted(columns, input_ids.contiguous())
        arrivals = counts_before.new_zeros(batch, length, len(columns)).scatter_(2, column_of_input.unsqueeze(2), 1.0)
        seen = arrivals.cumsum_(1).add_(counts_before[:, columns].unsqueeze(1))
        return self._mixture(hidden, logits, columns, seen, self._totals(counts_before, length))

    @staticmethod
    def _totals(counts_before: torch.Tensor, length: int) -> torch.Tensor:
        """Tokens read by each position [B, n] of a window of `length`: those before it and its own so far."""
        return counts_before.sum(1, keepdim=True) + torch.arange(1, length + 1, device=counts_before.device)

    def _mixture(
        self, hidden: torch.Tensor, logits: torch.Tensor, columns: torch.Tensor, seen: torch.Tensor, total: torch.Tensor
    ) -> torch.Tensor:
        """The softmax's share of every token, plus the cache's share of the tokens in `columns` [K]
        (those the document has used: elsewhere the cache gives nothing), which occurred `seen`
        [..., K] times out of `total` [...]. Working on those columns only keeps the cost near
        that of a log-softmax: over all V columns a window cost five times as much (docs/architecture.md)."""
        model_log_weight, cache_log_weight = self._log_weights(hidden)
        log_probs = at_least_float32(logits).log_softmax(-1) + model_log_weight.unsqueeze(-1)
        cache_log_probs = cache_log_weight.unsqueeze(-1) + seen.log() - total.clamp(min=1).log().unsqueeze(-1)
        mixed = torch.logaddexp(log_probs.index_select(-1, columns), cache_log_probs)
        return log_probs.index_copy(-1, columns, mixed)
