import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bakallm.data.batching import DOCUMENT_MODES, IGNORE_INDEX, MODES, DocumentBatcher
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError

PAD = 0
CHUNK = 2
CTX = 2 * CHUNK  # two chunks per step


def numbered_corpus(lengths):
    """Documents whose tokens are consecutive numbers from 1 on, so a token value tells where it came from."""
    ends = np.cumsum([1] + list(lengths))
    token_lists = [list(range(end - length, end)) for end, length in zip(ends[1:], lengths, strict=True)]
    return TokenizedCorpus.from_token_lists(token_lists, vocab_size=int(ends[-1])), token_lists


def reference_corpus():
    # A1 has 4 chunks, A2 1, A3 4, A4 2; a document of k chunks has k * CHUNK + 1 tokens.
    return numbered_corpus([4 * CHUNK + 1, 1 * CHUNK + 1, 4 * CHUNK + 1, 2 * CHUNK + 1])


def window(document, first_chunk):
    """(inputs, targets) of the step that starts at chunk `first_chunk` of `document`, padded to CTX."""
    start = first_chunk * CHUNK
    inputs = document[start : start + CTX][: len(document) - 1 - start]
    targets = document[start + 1 : start + CTX + 1]
    padding = CTX - len(targets)
    return inputs + [PAD] * padding, targets + [IGNORE_INDEX] * padding


IDLE = ([PAD] * CTX, [IGNORE_INDEX] * CTX)


def assert_batch(batch, rows, reset):
    assert batch.input_ids.tolist() == [inputs for inputs, _ in rows]
    assert batch.targets.tolist() == [targets for _, targets in rows]
    assert batch.reset.tolist() == reset
    assert batch.n_targets == sum(t != IGNORE_INDEX for _, targets in rows for t in targets)


def test_dynamic_mode_reference_example():
    corpus, (a1, a2, a3, a4) = reference_corpus()
    batcher = DocumentBatcher(corpus, batch_size=3, train_ctx=CTX, mode="dynamic")
    first = batcher.next_batch()
    assert_batch(first, [window(a1, 0), window(a2, 0), window(a3, 0)], reset=[True, True, True])
    assert window(a2, 0) == ([a2[0], a2[1], PAD, PAD], [a2[1], a2[2], IGNORE_INDEX, IGNORE_INDEX])
    assert (first.epoch, first.epoch_end, first.epoch_fraction) == (0, False, 10 / 22)
    second = batcher.next_batch()
    assert_batch(second, [window(a1, 2), window(a4, 0), window(a3, 2)], reset=[False, True, False])
    assert (second.epoch, second.epoch_end, second.epoch_fraction) == (0, True, 1.0)
    assert batcher.epoch == 1
    again = batcher.next_batch()
    assert_batch(again, [window(a1, 0), window(a2, 0), window(a3, 0)], reset=[True, True, True])
    assert again.epoch == 1


def test_static_mode_reference_example():
    corpus, (a1, a2, a3, a4) = reference_corpus()
    batcher = DocumentBatcher(corpus, batch_size=3, train_ctx=CTX, mode="static", max_epochs=1)
    batches = [batcher.next_batch() for _ in range(3)]
    assert_batch(batches[0], [window(a1, 0), window(a2, 0), window(a3, 0)], reset=[True, True, True])
    assert_batch(batches[1], [window(a1, 2), IDLE, window(a3, 2)], reset=[False, True, False])
    assert_batch(batches[2], [window(a4, 0), IDLE, IDLE], reset=[True, True, True])  # the run's end drains
    assert [batch.epoch_end for batch in batches] == [False, False, True]
    assert [batch.epoch_fraction for batch in batches] == [10 / 22, 18 / 22, 1.0]
    assert batcher.next_batch() is None


def test_rows_roll_into_the_next_epoch_instead_of_idling():
    corpus, (a1, a2, a3, a4) = reference_corpus()
    batcher = DocumentBatcher(corpus, batch_size=3, train_ctx=CTX, mode="static")
    batches = [batcher.next_batch() for _ in range(4)]
    assert_batch(batches[2], [window(a4, 0), window(a1, 0), window(a2, 0)], reset=[True, True, True])
    assert [(batch.epoch, batch.epochs_ended) for batch in batches] == [(0, 0), (0, 0), (0, 1), (1, 0)]
    assert batches[2].epoch_fraction == 1.0
    assert batches[2].padding_share == 1 - (4 + 4 + 2) / 12
    # Static groups still wait for their slowest row; epoch 1 holds a1's first 4 and a2's 2 targets, then a1's next 4.
    assert_batch(batches[3], [IDLE, window(a1, 2), IDLE], reset=[True, False, True])
    assert batches[3].epoch_fraction == (6 + 4) / 22


def test_count_batches_matches_the_batches_delivered():
    rng = np.random.default_rng(5)
    corpus, _ = numbered_corpus(rng.integers(0, 60, size=30).tolist())
    for mode in MODES:
        for max_doc_tokens in (None, 7):
            batcher = DocumentBatcher(
                corpus, 4, 5, mode=mode, shuffle=True, seed=2, max_epochs=3, max_doc_tokens=max_doc_tokens
            )
            for _ in range(5):
                batcher.next_batch()  # counting starts from the beginning whatever the position
            expected = len(
                list(
                    DocumentBatcher(
                        corpus, 4, 5, mode=mode, shuffle=True, seed=2, max_epochs=3, max_doc_tokens=max_doc_tokens
                    )
                )
            )
            assert batcher.count_batches() == expected


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=25), min_size=1, max_size=10).filter(lambda ls: max(ls) >= 2),
    batch_size=st.integers(min_value=1, max_value=5),
    train_ctx=st.integers(min_value=1, max_value=7),
    epochs=st.integers(min_value=1, max_value=3),
    max_doc_tokens=st.one_of(st.none(), st.integers(min_value=1, max_value=9)),
    shuffle=st.booleans(),
)
def test_rolling_epochs_deliver_every_target_once_per_epoch_and_idle_only_at_the_end(
    lengths, batch_size, train_ctx, epochs, max_doc_tokens, shuffle
):
    corpus, token_lists = numbered_corpus(lengths)
    expected_targets = sorted(t for tokens in token_lists if len(tokens) >= 2 for t in tokens[1:])
    batcher = DocumentBatcher(
        corpus, batch_size, train_ctx, shuffle=shuffle, seed=1, max_epochs=epochs, max_doc_tokens=max_doc_tokens
    )
    seen, epochs_ended, idle_seen = [], 0, False
    for batch in batcher:
        targets = batch.targets.numpy()
        counts = (targets != IGNORE_INDEX).sum(axis=1)
        if (batch.reset.numpy() & (counts > 0)).any():
            assert not idle_seen  # once a row idles, the stream has ended: no row starts a document again
        idle_seen = idle_seen or (counts == 0).any()
        assert batch.epoch == epochs_ended
        epochs_ended += batch.epochs_ended
        seen += targets[targets != IGNORE_INDEX].tolist()
    assert epochs_ended == epochs
    assert sorted(seen) == sorted(expected_targets * epochs)


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=25), min_size=1, max_size=10).filter(lambda ls: max(ls) >= 2),
    batch_size=st.integers(min_value=1, max_value=4),
    train_ctx=st.integers(min_value=1, max_value=7),
    mode=st.sampled_from(DOCUMENT_MODES),
    shuffle=st.booleans(),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_every_non_first_token_is_a_target_exactly_once_per_epoch(lengths, batch_size, train_ctx, mode, shuffle, seed):
    corpus, token_lists = numbered_corpus(lengths)
    first_tokens = {tokens[0] for tokens in token_lists if tokens}
    expected_targets = sorted(t for tokens in token_lists if len(tokens) >= 2 for t in tokens[1:])
    batcher = DocumentBatcher(
        corpus, batch_size, train_ctx, mode=mode, shuffle=shuffle, seed=seed, pad_id=PAD, max_epochs=1
    )
    seen_targets, last_target_of_row = [], [None] * batch_size
    idle_seen = False
    for _ in range(sum(lengths) + len(lengths) + 1):
        batch = batcher.next_batch()
        assert batch.epoch == 0
        inputs, targets, reset = batch.input_ids.numpy(), batch.targets.numpy(), batch.reset.numpy()
        counts = (targets != IGNORE_INDEX).sum(axis=1)
        starts = [bool(reset[row] and counts[row]) for row in range(batch_size)]
        if any(starts):
            assert not idle_seen if mode == "dynamic" else reset.all()
        for row, count in enumerate(counts):
            assert (targets[row, count:] == IGNORE_INDEX).all() and (inputs[row, count:] == PAD).all()
            # The input before each target is its predecessor in the same document.
            assert (inputs[row, :count] + 1 == targets[row, :count]).all()
            assert not first_tokens.intersection(targets[row, :count].tolist())
            if count == 0:
                assert reset[row]
            elif reset[row]:
                assert inputs[row, 0] in first_tokens
            else:
                assert inputs[row, 0] == last_target_of_row[row]  # the row continues its document
            last_target_of_row[row] = targets[row, count - 1] if count else None
            seen_targets += targets[row, :count].tolist()
        idle_seen = idle_seen or (counts == 0).any()
        assert batch.n_targets == counts.sum()
        assert batch.epoch_fraction == len(seen_targets) / len(expected_targets)
        if batch.epoch_end:
            break
    assert batch.epoch_end
    assert sorted(seen_targets) == expected_targets
    assert batcher.next_batch() is None


def test_hypothesis_draws_fixed_examples_in_ci():
    from conftest import RUNNING_IN_CI

    assert settings.get_profile("ci").derandomize
    assert settings.default.derandomize or not RUNNING_IN_CI


@pytest.mark.parametrize("mode", ["dynamic", "windows"])
def test_state_dict_round_trip_mid_epoch_with_shuffle(mode):
    rng = np.random.default_rng(3)
    corpus, _ = numbered_corpus(rng.integers(0, 40, size=25).tolist())
    settings = dict(batch_size=3, train_ctx=5, mode=mode, shuffle=True, seed=11)
    original = DocumentBatcher(corpus, **settings)
    for _ in range(7):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    restored = DocumentBatcher(corpus, **settings)
    restored.load_state_dict(state)
    epochs_seen = set()
    for _ in range(120):  # several epochs, so reshuffling after a restore is covered too
        expected, actual = original.next_batch(), restored.next_batch()
        assert actual.input_ids.tolist() == expected.input_ids.tolist()
        assert actual.targets.tolist() == expected.targets.tolist()
        assert actual.reset.tolist() == expected.reset.tolist()
        assert (actual.n_targets, actual.epoch, actual.epoch_fraction, actual.epoch_end) == (
            expected.n_targets,
            expected.epoch,
            expected.epoch_fraction,
            expected.epoch_end,
        )
        epochs_seen.add(actual.epoch)
    assert len(epochs_seen) >= 3
    assert restored.state_dict() == original.state_dict()


def test_state_from_other_settings_is_refused():
    corpus, _ = reference_corpus()
    state = DocumentBatcher(corpus, batch_size=3, train_ctx=CTX).state_dict()
    with pytest.raises(UserError, match="made with a different batch_size; resume with the same"):
        DocumentBatcher(corpus, batch_size=2, train_ctx=CTX).load_state_dict(state)
    other_corpus, _ = numbered_corpus([5, 5])
    with pytest.raises(UserError, match="made with a different corpus_fingerprint"):
        DocumentBatcher(other_corpus, batch_size=3, train_ctx=CTX).load_state_dict(state)


def first_epoch_inputs(batcher):
    inputs = []
    while True:
        batch = batcher.next_batch()
        inputs.append(batch.input_ids.tolist())
        if batch.epoch_end:
            return inputs


def test_shuffle_is_reproducible_from_the_seed_and_changes_every_epoch():
    corpus, _ = numbered_corpus([3] * 30)
    batcher = DocumentBatcher(corpus, batch_size=2, train_ctx=4, shuffle=True, seed=5)
    epoch_0, epoch_1 = first_epoch_inputs(batcher), first_epoch_inputs(batcher)
    assert epoch_0 == first_epoch_inputs(DocumentBatcher(corpus, batch_size=2, train_ctx=4, shuffle=True, seed=5))
    assert epoch_0 != epoch_1
    assert epoch_0 != first_epoch_inputs(DocumentBatcher(corpus, batch_size=2, train_ctx=4, shuffle=True, seed=6))
    assert sorted(row for batch in epoch_0 for row in batch) == sorted(row for batch in epoch_1 for row in batch)
    unshuffled = first_epoch_inputs(DocumentBatcher(corpus, batch_size=2, train_ctx=4))
    assert unshuffled[0] == [[1, 2, 0, 0], [4, 5, 0, 0]]


def test_max_epochs_ends_iteration():
    corpus, _ = reference_corpus()
    batches = list(DocumentBatcher(corpus, batch_size=3, train_ctx=CTX, mode="static", max_epochs=2))
    assert [(batch.epoch, batch.epoch_end) for batch in batches] == [
        (0, False),
        (0, False),
        (0, True),
        (1, False),
        (1, False),
        (1, True),
    ]


def test_documents_without_targets_are_skipped():
    corpus, token_lists = numbered_corpus([1, 0, 3, 1])
    batch = DocumentBatcher(corpus, batch_size=2, train_ctx=4, max_epochs=1).next_batch()
    assert batch.input_ids.tolist() == [[2, 3, 0, 0], [0, 0, 0, 0]]
    assert batch.targets.tolist() == [[3, 4, -100, -100], [-100] * 4]
    assert batch.reset.tolist() == [True, True] and batch.epoch_end


def test_corpus_without_targets_and_bad_settings_are_refused():
    short, _ = numbered_corpus([1, 1, 0])
    with pytest.raises(UserError, match="No document of the corpus has 2 or more tokens"):
        DocumentBatcher(short, batch_size=2, train_ctx=4)
    corpus, _ = reference_corpus()
    with pytest.raises(UserError, match="Unknown batching mode 'packed'; use one of dynamic, static, windows"):
        DocumentBatcher(corpus, batch_size=2, train_ctx=4, mode="packed")
    with pytest.raises(UserError, match="must be at least 1"):
        DocumentBatcher(corpus, batch_size=0, train_ctx=4)


def test_max_doc_tokens_cuts_long_documents_into_independent_pieces():
    corpus, (document,) = numbered_corpus([10])  # tokens 1..10: targets 2..10
    batcher = DocumentBatcher(corpus, batch_size=3, train_ctx=8, max_epochs=1, max_doc_tokens=4)
    batch = batcher.next_batch()
    assert batch.reset.tolist() == [True, True, True]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 0, 0, 0, 0], [5, 6, 7, 8, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0, 0, 0]]
    assert batch.targets[:, :4].tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, -100, -100, -100]]
    assert batch.epoch_end and batcher.next_batch() is None
    with pytest.raises(UserError, match="different max_doc_tokens"):
        DocumentBatcher(corpus, batch_size=3, train_ctx=8).load_state_dict(batcher.state_dict())


def test_windows_mode_draws_each_start_equally_often_and_keeps_windows_inside_one_document():
    corpus, token_lists = numbered_corpus([3, 10, 6, 1])  # 2, 9, 5 and 0 targets
    batcher = DocumentBatcher(corpus, batch_size=3, train_ctx=4, mode="windows", seed=7)
    first_inputs = Counter()
    for _ in range(600):
        batch = batcher.next_batch()
        assert batch.reset.all()  # no row carries a state from one random window to the next
        for inputs, targets in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
            document = next(tokens for tokens in token_lists if inputs[0] in tokens)
            count = min(4, len(document) - 1)  # a full window wherever the document holds one
            assert targets == list(range(inputs[0] + 1, inputs[0] + 1 + count)) + [IGNORE_INDEX] * (4 - count)
            assert targets[count - 1] in document
            first_inputs[inputs[0]] += 1
    # Starts: the only one of the 3-token document, 6 of the 10-token one, 2 of the 6-token one.
    starts = token_lists[0][:1] + token_lists[1][:6] + token_lists[2][:2]
    assert sorted(first_inputs) == starts
    assert all(150 < first_inputs[start] < 250 for start in starts)  # 1,800 draws over 9 starts: 200 each


def test_windows_mode_counts_epochs_in_targets_and_ends_after_max_epochs():
    corpus, _ = numbered_corpus([3, 10, 6])  # 16 targets an epoch
    batches = list(DocumentBatcher(corpus, batch_size=2, train_ctx=4, mode="windows", seed=1, max_epochs=2))
    delivered = np.cumsum([batch.n_targets for batch in batches])
    assert delivered[-2] < 32 <= delivered[-1]  # the run stops at the first batch that completes epoch 2
    assert sum(batch.epochs_ended for batch in batches) == 2
    assert [batch.epoch for batch in batches] == [int(before) // 16 for before in [0, *delivered[:-1]]]
    assert batches[-1].epoch_fraction == 1.0
