import pytest
import torch

from bakallm import BakaLM, ModelConfig, RecurrentState


def make_state(**changes) -> tuple[BakaLM, RecurrentState]:
    model = BakaLM(ModelConfig.preset("tiny", vocab_size=100, window=16, n_pauses=2, n_layers=2, **changes))
    return model, model(torch.randint(0, 100, (3, 20))).state


CACHES = {
    "no cache": {},
    "unigram cache": {"document_cache": True},
    "n-gram cache": {"document_cache": True, "document_cache_order": 3},
}


@pytest.mark.parametrize("cache", CACHES)
def test_reset_clears_only_the_selected_rows_even_when_they_hold_nan(cache):
    _, state = make_state(**CACHES[cache])
    assert ("token_counts" in state.to_dict()) == (cache != "no cache")
    assert ("ngram_keys.1" in state.to_dict()) == (cache == "n-gram cache")
    state = RecurrentState(
        **{**state.__dict__, "memory": state.memory.clone().index_fill_(0, torch.tensor([1]), float("nan"))}
    )
    reset = state.reset(torch.tensor([False, True, False]))
    assert reset.has_past.tolist() == [True, False, True]
    for name, tensor in reset.to_dict().items():
        if name != "has_past":
            assert torch.equal(tensor[1], torch.zeros_like(tensor[1])), name
            assert torch.equal(tensor[0], state.to_dict()[name][0]), name


def test_select_reorders_rows_and_detach_cuts_the_graph():
    _, state = make_state()
    picked = state.select([2, 0])
    assert picked.batch_size == 2
    assert torch.equal(picked.keys[1][0], state.keys[1][2]) and torch.equal(picked.ssm[0][1], state.ssm[0][0])
    assert state.memory.requires_grad and not state.detach().memory.requires_grad


@pytest.mark.parametrize("cache", CACHES)
def test_flat_dict_round_trip(cache):
    model, state = make_state(**CACHES[cache])
    flat = state.detach().to_dict()
    assert ("token_counts" in flat) == (cache != "no cache")
    assert ("recent_tokens" in flat) == (cache == "n-gram cache")
    assert set(flat) >= {"memory", "has_past", "keys.0", "keys.1", "values.1", "conv.1", "ssm.1"}
    restored = RecurrentState.from_dict(flat)
    ids = torch.randint(0, 100, (3, 8))
    torch.testing.assert_close(model(ids, state=restored).logits, model(ids, state=state).logits)


def test_every_field_is_mapped_saved_and_restored_generically():
    """A field added to RecurrentState is reset, selected, saved and restored without other edits."""
    from dataclasses import fields

    _, state = make_state(**CACHES["n-gram cache"])
    state = state.detach()
    restored = RecurrentState.from_dict(state.to_dict())
    picked = state.select([1])
    for entry in fields(RecurrentState):
        original, back, one = getattr(state, entry.name), getattr(restored, entry.name), getattr(picked, entry.name)
        originals, backs, ones = (value if isinstance(value, tuple) else (value,) for value in (original, back, one))
        assert originals and len(originals) == len(backs) == len(ones), entry.name
        for tensor, again, row in zip(originals, backs, ones):
            assert torch.equal(tensor, again) and torch.equal(row, tensor[1:2]), entry.name
