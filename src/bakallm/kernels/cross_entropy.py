"""Cross-entropy of a linear output head, in chunks of tokens, so that the [tokens, vocab] float32
logits never all exist at once (the reference is F.cross_entropy on the whole logits).

For a 50K vocabulary a training window of 8 x 512 tokens has 0.8 GB of float32 logits, and
autograd would keep those of every window of the step alive until backward. Here each chunk's
logits live only while the chunk is processed: forward computes the chunk's loss and, when
gradients are wanted, at once the chunk's gradients (softmax minus one-hot, times the head) of the
hidden states and of the head's weight. Backward only scales them by the incoming gradient. What
stays alive until backward is one tensor the size of the hidden states and one the size of the
weight, instead of the logits.

With `mixture`, the loss is that of a two-component mixture, -log(exp(a) p_model(y) + exp(b)) per
token: `a` the log-weight of the head's softmax, `b` the log-probability the other component gives
the target (the document cache of bakallm.model.document_cache, already weighted). The gradients
are then those of the softmax's own cross-entropy for the hidden states and the head, and those
of the mixture's loss, the softmax's probabilities taken as given, for a and b: the other
component only learns how much to be trusted and never takes gradient from the softmax
(docs/quality.md, Finding 9, measured why).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024
_NARROW_HEAD = 256  # d_model below which the head's gradient is summed transposed


def _accumulate_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """total += left @ right, in place when the dtypes allow (no temporary the size of `total`)."""
    if left.dtype == total.dtype:
        total.addmm_(left, right)
    else:
        total += left @ right


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        model_log_weight,
        other_log_prob,
        vocab_size: int,
        chunk_tokens: int,
        with_gradients: bool,
    ):
        mixed = model_log_weight is not None
        device_type = hidden.device.type
        # The dtype the head's products run in: autocast's, as nn.Linear's would, or the inputs'.
        compute_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else torch.promote_types(hidden.dtype, weight.dtype)
        )
        head = weight[:vocab_size].to(compute_dtype)
        loss = hidden.new_zeros((), dtype=torch.float32)
        all_token_losses = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if with_gradients else None
        # A narrow head's gradient is summed as [d, vocab], then copied transposed once: MKL
        # accumulates the product into that layout 1.6x faster at d = 128 (one thread). From
        # d = 256 on the two run within 6% of each other, and the copy (84 ms at d = 768) is saved.
        transposed = hidden.shape[1] < _NARROW_HEAD
        grad_head = None
        if with_gradients:
            # Untransposed, it is the weight's gradient itself, padding rows included (left zero).
            shape = (hidden.shape[1], vocab_size) if transposed else weight.shape
            grad_head = hidden.new_zeros(shape, dtype=torch.float32)
        grad_model_log_weight = (
            torch.zeros_like(model_log_weight, dtype=torch.float32) if with_gradients and mixed else None
        )
        grad_other_log_prob = (
            torch.zeros_like(other_log_prob, dtype=torch.float32) if with_gradients and mixed else None
        )
        # Two chunk-sized buffers serve every chunk: on a CPU a fresh tensor of this size (206 MB
        # for 1024 x 50277 float32) costs more in page faults than the pass that fills it.
        rows = min(chunk_tokens, hidden.shape[0])
        logits_buffer = hidden.new_empty(rows, vocab_size, dtype=compute_dtype)
        log_probs_buffer = hidden.new_empty(rows, vocab_size, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start : start + chunk_tokens].to(compute_dtype)
            size = chunk.shape[0]
            chunk_targets = targets[start : start + size]
            scored = chunk_targets != IGNORE_INDEX
            safe_targets = torch.where(scored, chunk_targets, 0).unsqueeze(1)
            logits = torch.mm(chunk, head.t(), out=logits_buffer[:size])
            # log_softmax, not logits - logsumexp(logits): one fused pass, and on a CPU 22% faster
            # for the loss alone and 30% with the softmax that the gradient needs (1024 x 50277).
            log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32, out=log_probs_buffer[:size])
            token_losses = -log_probs.gather(1, safe_targets).squeeze(1)
            if mixed:
                model_term = model_log_weight[start : start + size].float() - token_losses
                log_mixture = torch.logaddexp(model_term, other_log_prob[start : start + size].float())
                model_share = (model_term - log_mixture).exp()
                token_losses = -log_mixture
            token_losses = torch.where(scored, token_losses, 0.0)
            all_token_losses[start : start + size] = token_losses
            loss += token_losses.sum()
            if with_gradients:
                grad_logits = log_probs.exp_()  # softmax, in place
                grad_logits.scatter_add_(1, safe_targets, grad_logits.new_full(safe_targets.shape, -1.0))
                grad_logits = grad_logits.to(compute_dtype)
                # Unscored tokens' rows are zeroed in the two [tokens, d] operands and results, not in
                # the [tokens, vocab] gradient: the same products, without a pass over the largest tensor.
                keep = scored.unsqueeze(1).to(compute_dtype)
                grad_hidden[start : start + size] = (grad_logits @ head).mul_(keep)
                if transposed:
                    _accumulate_product(grad_head, (chunk * keep).t(), grad_logits)
                else:
                    _accumulate_product(grad_head[:vocab_size], grad_logits.t(), chunk * keep)
                if mixed:
                    grad_model_log_weight[start : start + size] = torch.where(scored, -model_share, 0.0)
                    grad_other_log_prob[start : start + size] = torch.where(scored, model_share - 1.0, 0.0)
        grad_weight = None
        if with_gradients:
            # The chunk buffers (and the views of them) go before the head-sized gradient is made.
            logits_buffer = log_probs_buffer = logits = log_probs = grad_logits = None
            grad_weight = grad_head
            if transposed:
                grad_weight = weight.new_empty(weight.shape, dtype=torch.float32)
                grad_weight[:vocab_size].copy_(grad_head.t())
                grad_weight[vocab_size:].zero_()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_model_log_weight, grad_other_log_prob)
        ctx.dtypes = (
            weight.dtype,
            None if not mixed else model_log_weight.dtype,
            None if not mixed else other_log_prob.dtype,
        )
        ctx.mark_non_differentiable(all_token_losses)
        return loss, all_token_losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_losses):
        grad_hidden, grad_weight, grad_model_log_weight, grad_other_log_prob = ctx.saved_tensors
        weight_dtype, model_log_weight_dtype, other_log_prob_dtype = ctx.dtypes
        mixture_grads = (None, None)
        if grad_model_log_weight is not None:
            mixture_grads = (
                (grad_model_log_weight * grad_loss).to(model_log_weight_dtype),
                (grad_other_log_prob * grad_loss).to(other_log_prob_dtype),
            )
        # In place: the head's gradient is as large as the head, and a fresh copy of it costs more
        # than the multiplication (new pages). Autograd refuses a second backward through this call.
        grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        return grad_hidden, grad_weight.mul_(grad_loss).to(weight_dtype), None, *mixture_grads, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    mixture: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_token_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (float32) of the logits hidden [N, d] @ weight[:vocab_size].T against
    targets [N] (IGNORE_INDEX: not scored): F.cross_entropy(..., reduction="sum") of those logits,
    without holding them. vocab_size leaves out padding rows of the weight (default: all rows).

    mixture=(a, b), two [N] tensors, scores the mixture exp(a) softmax(logits) + exp(b) instead:
    a is the log-weight of the softmax, b the other component's weighted log-probability of each
    target (-inf where it gives the target none). hidden and weight then get the gradients of the
    softmax's own cross-entropy, a and b those of the mixture's loss with the softmax held fixed.

    return_token_losses=True also returns each token's loss [N] (float32, 0 where not scored,
    without gradient): what evaluation needs, at no extra cost."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    model_log_weight, other_log_prob = mixture if mixture is not None else (None, None)
    inputs = (hidden, weight) if mixture is None else (hidden, weight, model_log_weight, other_log_prob)
    with_gradients = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)
    loss, token_losses = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, targets, model_log_weight, other_log_prob, vocab_size, chunk_tokens, with_gradients
    )
    return (loss, token_losses) if return_token_losses else loss
