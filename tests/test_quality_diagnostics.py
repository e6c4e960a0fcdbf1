"""benchmarks/quality_diagnostics.py: the unigram caches its `cache` mode mixes with a model's predictions."""

import torch

from conftest import load_benchmark


def test_caches_count_the_targets_before_the_window_and_inside_it_up_to_the_input():
    diagnostics = load_benchmark("quality_diagnostics")
    # Window 4: the second window reads 1 2 2 5 and predicts 2 2 5 9; the first window read 1 2 1 3.
    tokens = torch.tensor([[1, 2, 1, 3, 1, 2, 2, 5, 9], [4, 4, 4, 4, 4, 4, 7, 4, 4]])
    caches = diagnostics.cache_probabilities(tokens, window=4)
    torch.testing.assert_close(
        caches["before"], torch.tensor([[1 / 4, 1 / 4, 0, 0], [1, 0, 1, 1]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        caches["inside"], torch.tensor([[0, 1 / 2, 0, 0], [1, 0, 2 / 3, 3 / 4]], dtype=torch.float64)
    )


def test_the_document_cache_gives_each_target_its_share_of_the_tokens_read_so_far():
    diagnostics = load_benchmark("quality_diagnostics")
    # Reading 3 3 7 3 9 7: after 3 the next 3 has 1/1; after 3 3 the 7 has 0/2; then 2/3, 0/4, 1/5.
    got = diagnostics.document_cache_probabilities(torch.tensor([3, 3, 7, 3, 9, 7]))
    torch.testing.assert_close(got, torch.tensor([1, 0, 2 / 3, 0, 1 / 5], dtype=torch.float64))


def test_the_continuation_counts_are_what_followed_each_earlier_run_of_the_last_tokens():
    diagnostics = load_benchmark("quality_diagnostics")
    tokens = [3, 3, 7, 3, 3, 7, 3]
    # After one token: (3) was followed by 3 and 7 before position 3 predicts a 3 from a 3, and so on.
    contexts, continuations = diagnostics.continuation_counts(tokens, 1)
    assert contexts.tolist() == [0, 1, 0, 2, 3, 1] and continuations.tolist() == [0, 0, 0, 1, 1, 1]
    # After two tokens: (3 3) -> 7 is complete when position 4 reads 3 3 again, (3 7) -> 3 at position 5.
    contexts, continuations = diagnostics.continuation_counts(tokens, 2)
    assert contexts.tolist() == [0, 0, 0, 0, 1, 1] and continuations.tolist() == [0, 0, 0, 0, 1, 1]
