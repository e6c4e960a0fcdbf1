"""Chunked cross-entropy of the output head against F.cross_entropy on the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from bakallm.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy


def head_inputs(tokens=23, d_model=8, padded_vocab=40, dtype=torch.float64):
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, d_model, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(padded_vocab, d_model, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 37, (tokens,), generator=generator)
    targets[::4] = IGNORE_INDEX
    return hidden, weight, targets


# Chunks of one token, chunks that do not divide the 23 tokens, one chunk larger than all of them;
# a narrow head (its gradient summed transposed) and a wide one (summed in the weight's layout).
@pytest.mark.parametrize("d_model", [8, 256])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 23, 64])
def test_chunked_loss_and_gradients_equal_cross_entropy_on_the_whole_logits(chunk_tokens, d_model):
    hidden, weight, targets = head_inputs(d_model=d_model)
    vocab = 37  # the weight's last 3 rows are padding, outside the vocabulary
    want = F.cross_entropy(F.linear(hidden, weight[:vocab]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.7, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, vocab, chunk_tokens=chunk_tokens)
    got_grads = torch.autograd.grad(got * 0.7, (hidden, weight))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert not got_grads[1][vocab:].any()


def test_token_losses_are_each_tokens_cross_entropy_and_sum_to_the_loss():
    hidden, weight, targets = head_inputs()
    want = F.cross_entropy(F.linear(hidden, weight[:37]), targets, ignore_index=IGNORE_INDEX, reduction="none")
    loss, token_losses = linear_cross_entropy(hidden, weight, targets, 37, chunk_tokens=5, return_token_losses=True)
    assert (
        token_losses.shape == targets.shape and token_losses.dtype == torch.float32 and not token_losses.requires_grad
    )
    torch.testing.assert_close(token_losses.double(), want, rtol=1e-6, atol=1e-6)
    assert (token_losses[targets == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(token_losses.sum(), loss)
    loss.backward()  # the loss keeps its gradients
    assert hidden.grad is not None


def test_no_tensor_of_the_whole_logits_is_kept_for_backward():
    hidden, weight, targets = head_inputs(tokens=64, padded_vocab=40, dtype=torch.float32)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, targets, 37, chunk_tokens=16)
    assert sizes and max(sizes) <= max(hidden.numel(), weight.numel()) < 64 * 37
    loss.backward()


def test_without_gradients_it_computes_the_loss_only():
    hidden, weight, targets = head_inputs(dtype=torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 37, chunk_tokens=5)
        want = F.cross_entropy(F.linear(hidden, weight[:37]), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want)
