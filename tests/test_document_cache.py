"""The document cache: counts carried across windows and calls, the mixture's probabilities against
hand counts (unigram and n-gram), and the chunked mixture loss against autograd on the whole
log-probabilities."""

import math

import pytest
import torch
import torch.nn.functional as F

from bakallm import BakaLM, ModelConfig
from bakallm.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 8


def cache_model(gate_bias: float | None = None, order: int = 1) -> BakaLM:
    config = ModelConfig.preset(
        "tiny",
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        window=WINDOW,
        n_memory=2,
        n_pauses=2,
        document_cache=True,
        document_cache_order=order,
    )
    torch.manual_seed(0)
    model = BakaLM(config).double().eval()
    cache = model.document_cache
    with torch.no_grad():
        if gate_bias is None:  # gates that differ from position to position
            cache.gate_weight.normal_(0, 1)
            if order > 1:
                cache.ngram_gate_weight.normal_(0, 1)
        else:
            cache.gate_bias.fill_(gate_bias)
            if order > 1:
                cache.ngram_gate_bias.fill_(gate_bias)
    return model


@pytest.mark.parametrize("chunk_tokens", [3, 64])
def test_chunked_mixture_loss_is_the_mixtures_with_the_gradients_of_the_softmaxs_own_loss_and_of_the_mixture_for_the_weights(
    chunk_tokens,
):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(17, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (17,), generator=generator)
    targets[::5] = IGNORE_INDEX
    model_log_weight = torch.randn(17, generator=generator, dtype=torch.float64).sigmoid().log().requires_grad_()
    other = torch.randn(17, generator=generator, dtype=torch.float64) - 2
    other[1::3] = -math.inf  # the cache gives these targets nothing
    other.requires_grad_()
    got = linear_cross_entropy(
        hidden, weight, targets, 37, chunk_tokens=chunk_tokens, mixture=(model_log_weight, other)
    )
    log_softmax = F.log_softmax(hidden @ weight[:37].t(), dim=1)
    scored = targets != IGNORE_INDEX
    picked = log_softmax.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)

    def mixture_loss(picked):
        return -torch.where(scored, torch.logaddexp(model_log_weight + picked, other), 0.0).sum()

    torch.testing.assert_close(got.double(), mixture_loss(picked), rtol=1e-6, atol=1e-5)
    objective = -torch.where(scored, picked, 0.0).sum() + mixture_loss(picked.detach())
    inputs = (hidden, weight, model_log_weight, other)
    got_grads = torch.autograd.grad(got * 0.7, inputs)
    want_grads = torch.autograd.grad(objective * 0.7, inputs)
    for name, g, w in zip(("hidden", "weight", "model_log_weight", "other"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert not got_grads[3][1::3].any() and not got_grads[3][::5].any()


def test_with_the_gate_open_the_probabilities_are_the_counts_of_the_document_so_far():
    model = cache_model(gate_bias=60.0)  # sigmoid(60): the cache alone, to within e^-60
    ids = torch.tensor([[3, 3, 7, 3, 9, 7, 3, 3, 1, 7, 4, 3, 7, 7, 9, 2, 3, 1, 1, 3]])  # three windows of 8
    with torch.no_grad():
        log_probs = model(ids).logits[0]
        # In pieces that cut windows, with the state carried: the same counts (a forward call ends
        # its last window where the piece ends, so only the model's e^-60 share differs).
        state, pieces = None, []
        for start, stop in ((0, 5), (5, 13), (13, 20)):
            out = model(ids[:, start:stop], state=state)
            state, pieces = out.state, pieces + [out.logits[0]]
    for position in range(ids.shape[1]):
        seen = ids[0, : position + 1].tolist()
        for token in (3, 7, 9, 2):
            if token in seen:
                assert log_probs[position, token].item() == pytest.approx(
                    math.log(seen.count(token) / len(seen)), abs=1e-6
                ), (position, token)
            else:  # only the model's share, e^-60 of the mixture
                assert log_probs[position, token].item() < -55, (position, token)
    counted = log_probs > -50
    torch.testing.assert_close(torch.cat(pieces)[counted], log_probs[counted])
    assert (
        state.token_counts[0, 3].item() == 8
        and state.token_counts[0, 7].item() == 5
        and state.token_counts.sum().item() == 20
    )


@pytest.mark.parametrize("order", [1, 3])
def test_the_loss_is_the_mixtures_the_network_trains_as_without_the_cache_and_the_gate_on_the_mixture(order):
    model = cache_model(order=order)
    twin = BakaLM(model.config.replace(document_cache=False, document_cache_order=1)).double()
    twin.load_state_dict(
        {name: value for name, value in model.state_dict().items() if not name.startswith("document_cache.")}
    )
    ids = torch.randint(
        0, 12, (2, 3 * WINDOW + 3), generator=torch.Generator().manual_seed(2)
    )  # repeats: the cache matters
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[1, 4] = IGNORE_INDEX
    output = model(ids, targets=targets, return_logits=True)
    mixture_loss = F.cross_entropy(output.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss.double(), mixture_loss, rtol=1e-6, atol=1e-6)
    # Each target's loss, as evaluation reads it, is that of the full distribution too.
    token_losses = F.cross_entropy(
        output.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    torch.testing.assert_close(
        output.token_losses.double(), token_losses.view(targets.shape).double(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        output.logits.exp().sum(-1), torch.ones(2, ids.shape[1], dtype=output.logits.dtype), rtol=0, atol=1e-5
    )
    names = [name for name, _ in model.named_parameters()]
    got = dict(zip(names, torch.autograd.grad(output.loss, list(model.parameters()), allow_unused=True)))
    want_network = dict(
        zip(
            (n for n, _ in twin.named_parameters()),
            torch.autograd.grad(twin(ids, targets=targets).loss, list(twin.parameters()), allow_unused=True),
        )
    )
    gate_names = [f"document_cache.{name}" for name, _ in model.document_cache.named_parameters()]
    gate = list(model.document_cache.parameters())
    want_gate = torch.autograd.grad(
        mixture_loss, gate
    )  # the gate reads a detached hidden state: its gradient is the mixture's
    for name, want in want_network.items():
        if want is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(
                got[name].double(), want, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
            )
    assert all(got[name].abs().sum() > 0 for name in gate_names)
    for name, w in zip(gate_names, want_gate):
        torch.testing.assert_close(got[name].double(), w, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_a_reset_row_forgets_its_counts_and_the_other_keeps_them():
    model = cache_model(gate_bias=60.0)
    ids = torch.tensor([[4, 4, 4, 4], [5, 5, 5, 5]])
    with torch.no_grad():
        state = model(ids).state
        out = model(torch.tensor([[6, 6], [6, 6]]), state=state, reset=torch.tensor([True, False]))
    assert out.state.token_counts[0].tolist() == [0.0] * 6 + [2.0] + [0.0] * 43
    assert out.state.token_counts[1, 5].item() == 4 and out.state.token_counts[1, 6].item() == 2
    assert out.logits[0, 0, 6].item() == pytest.approx(0.0, abs=1e-6)  # only a 6 seen since the reset
    assert out.logits[1, 0, 5].item() == pytest.approx(math.log(4 / 5), abs=1e-6)


@pytest.mark.parametrize("init", ["scaled_normal", "pytorch_default"])
def test_from_one_seed_the_network_starts_as_it_would_without_the_cache(init):
    config = ModelConfig.preset(
        "tiny",
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        window=WINDOW,
        n_memory=2,
        n_pauses=2,
        init=init,
    )
    torch.manual_seed(3)
    with_cache = BakaLM(config.replace(document_cache=True)).state_dict()
    torch.manual_seed(3)
    without = BakaLM(config).state_dict()
    assert set(with_cache) - set(without) == {"document_cache.gate_weight", "document_cache.gate_bias"}
    for name, value in without.items():
        assert torch.equal(with_cache[name], value), name


def reference_ngram_mixture(ids: list[int], position: int, token: int, count_weights: list[float]) -> float:
    """The cache's probability of `token` after ids[: position + 1], all gates at one bias and no
    weight on the hidden state, counted by hand: a term per context length c = 0, 1, ..., whose
    weight is proportional to (1 + count of the context)^count_weight, and 0 for an unseen context."""
    read = ids[: position + 1]
    weights, probabilities = [1.0], [read.count(token) / len(read)]
    for length, count_weight in enumerate(count_weights, start=1):
        context = read[len(read) - length :]
        followers = (
            [read[j + length] for j in range(len(read) - length) if read[j : j + length] == context]
            if len(read) >= length
            else []
        )
        weights.append((1 + len(followers)) ** count_weight if followers else 0.0)
        probabilities.append(followers.count(token) / len(followers) if followers else 0.0)
    return sum(w * p for w, p in zip(weights, probabilities)) / sum(weights)


def test_the_ngram_terms_are_the_continuations_of_the_last_tokens_counted_by_hand():
    model = cache_model(gate_bias=60.0, order=3)  # e^60 against the softmax's 1: the cache alone
    count_weights = [0.5, 1.5]
    with torch.no_grad():
        model.document_cache.ngram_count_weight.copy_(torch.tensor(count_weights))
    ids = torch.tensor([[3, 3, 7, 3, 9, 7, 3, 3, 1, 7, 4, 3, 7, 7, 9, 2, 3, 1, 1, 3, 7, 3, 9, 7]])  # three windows of 8
    with torch.no_grad():
        log_probs = model(ids).logits[0]
        state, pieces = None, []
        for start, stop in ((0, 5), (5, 13), (13, 19), (19, 24)):  # cutting windows, the state carried
            out = model(ids[:, start:stop], state=state)
            state, pieces = out.state, pieces + [out.logits[0]]
    pieced = torch.cat(pieces)
    sequence = ids[0].tolist()
    for position in range(len(sequence)):
        for token in (3, 7, 9, 1, 2, 4):
            want = reference_ngram_mixture(sequence, position, token, count_weights)
            if want > 0:
                assert log_probs[position, token].item() == pytest.approx(math.log(want), abs=1e-6), (position, token)
                assert pieced[position, token].item() == pytest.approx(math.log(want), abs=1e-6), (position, token)
            else:
                assert log_probs[position, token].item() < -55, (position, token)
    bigrams = dict(zip(state.ngram_keys[0][0].tolist(), state.ngram_counts[0][0].tolist()))
    assert (
        bigrams[3 * 50 + 7] == 3
        and bigrams[7 * 50 + 3] == 3
        and bigrams[3 * 50 + 3] == 2
        and sum(bigrams.values()) == len(sequence) - 1
    )
    assert sum(state.ngram_counts[1][0].tolist()) == len(sequence) - 2 and state.recent_tokens[0].tolist() == [9, 7]


@pytest.mark.parametrize("order", [1, 3])
def test_the_training_loss_is_the_mixtures_at_every_order(order):
    model = cache_model(order=order)
    ids = torch.randint(
        0, 6, (2, 3 * WINDOW + 3), generator=torch.Generator().manual_seed(5)
    )  # a small alphabet: n-grams repeat
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    reset = torch.tensor([False, True])
    with torch.no_grad():
        state = model(ids[:, :11]).state
        output = model(ids, state=state, reset=reset, targets=targets, return_logits=True)
    mixture_loss = F.cross_entropy(output.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss.double(), mixture_loss, rtol=1e-6, atol=1e-6)
    # Each target's loss, as evaluation reads it, is that of the full distribution too.
    token_losses = F.cross_entropy(
        output.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    torch.testing.assert_close(
        output.token_losses.double(), token_losses.view(targets.shape).double(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        output.logits.exp().sum(-1), torch.ones(2, ids.shape[1], dtype=output.logits.dtype), rtol=0, atol=1e-5
    )


def test_a_reset_row_forgets_its_ngrams_and_the_other_keeps_them():
    model = cache_model(gate_bias=60.0, order=2)
    with torch.no_grad():
        state = model(torch.tensor([[4, 5, 4, 5], [5, 5, 5, 5]])).state
        out = model(torch.tensor([[6, 6], [6, 6]]), state=state, reset=torch.tensor([True, False]))
    fresh = dict(zip(out.state.ngram_keys[0][0].tolist(), out.state.ngram_counts[0][0].tolist()))
    kept = dict(zip(out.state.ngram_keys[0][1].tolist(), out.state.ngram_counts[0][1].tolist()))
    assert {key: count for key, count in fresh.items() if count} == {6 * 50 + 6: 1.0}
    assert {key: count for key, count in kept.items() if count} == {5 * 50 + 5: 3.0, 5 * 50 + 6: 1.0, 6 * 50 + 6: 1.0}
    # Row 0 has read "6 6" since its reset: after its first 6 nothing, after the second a 6 once.
    assert out.logits[0, 1, 6].item() == pytest.approx(0.0, abs=1e-6)


def test_merging_windows_into_the_tables_counts_every_valid_key_as_a_dictionary_would():
    from bakallm.model.document_cache import merge_ngrams

    generator = torch.Generator().manual_seed(3)
    batch = 3
    keys, counts = torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, 1)
    expected = [{} for _ in range(batch)]
    for step in range(12):
        # Small key ranges repeat keys inside a window and across windows; a wide one lands keys
        # before, between and after the ones already held.
        high = 8 if step % 3 else 10**12
        new_keys = torch.randint(0, high, (batch, 9), generator=generator)
        valid = torch.rand(batch, 9, generator=generator) > 0.25
        if step == 7:  # row 1 is reset, as RecurrentState.reset zeroes it
            keys[1], counts[1] = 0, 0.0
            expected[1] = {}
        keys, counts = merge_ngrams(keys, counts, new_keys, valid)
        for row in range(batch):
            for key, is_valid in zip(new_keys[row].tolist(), valid[row].tolist()):
                if is_valid:
                    expected[row][key] = expected[row].get(key, 0) + 1
            held = counts[row] > 0
            row_keys = keys[row][held].tolist()
            assert row_keys == sorted(expected[row]), (step, row)
            assert counts[row][held].tolist() == [expected[row][key] for key in row_keys]
            assert held.tolist() == sorted(held.tolist(), reverse=True)  # the entries first, then padding
        assert keys.shape[1] == max(1, max(len(table) for table in expected))
