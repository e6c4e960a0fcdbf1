"""Cross-entropy of a linear output head, in chunks of tokens, so that the [tokens, vocab] float32
logits never all exist at once (the reference is F.cross_entropy on the whole logits).

For a 50K vocabulary a training window of 8 x 512 tokens has 0.8 GB of float32 logits, and
autograd would keep those of every window of the step alive until backward. Here each chunk's
logits live only while the chunk is processed: forward computes the chunk's loss and, when
gradients are wanted, at once the chunk's gradients (softmax minus one-hot, times the head) of the
hidden states and of the head's weight. Backward only scales them by the incoming gradient. What
stays alive until backward is one tensor the size of the hidden states and one the size of the
weight, instead of the logits.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk_tokens: int, with_gradients: bool):
        head = weight[:vocab_size]
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if with_gradients else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_gradients else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start : start + chunk_tokens]
            chunk_targets = targets[start : start + chunk_tokens]
            scored = chunk_targets != IGNORE_INDEX
            safe_targets = torch.where(scored, chunk_targets, 0).unsqueeze(1)
            logits = (chunk @ head.t()).float()  # in autocast's dtype under autocast, as nn.Linear would be
            log_normalizer = torch.logsumexp(logits, dim=1, keepdim=True)
            token_losses = log_normalizer.squeeze(1) - logits.gather(1, safe_targets).squeeze(1)
            loss += torch.where(scored, token_losses, 0.0).sum()
            if with_gradients:
                grad_logits = logits.sub_(log_normalizer).exp_()  # softmax, in place of the logits
                grad_logits.scatter_add_(1, safe_targets, torch.full_like(token_losses, -1.0).unsqueeze(1))
                grad_logits = grad_logits.mul_(scored.unsqueeze(1)).to(chunk.dtype)
                grad_hidden[start : start + chunk_tokens] = grad_logits @ head.to(chunk.dtype)
                grad_weight[:vocab_size] += grad_logits.t() @ chunk
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed cross-entropy (float32) of the logits hidden [N, d] @ weight[:vocab_size].T against
    targets [N] (IGNORE_INDEX: not scored): F.cross_entropy(..., reduction="sum") of those logits,
    without holding them. vocab_size leaves out padding rows of the weight (default: all rows)."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    with_gradients = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_tokens, with_gradients)
