import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bakallm import BakaLM, ModelConfig
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError
from bakallm.evaluation.evaluate import evaluate_bakallm
from bakallm.evaluation.hf_baseline import evaluate_hf, hf_windows
from bakallm.evaluation.settings import EvalSettings
from bakallm.evaluation.tally import ArticleLossTally

WINDOW = 16
WHOLE_ARTICLE = 1 << 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**overrides) -> ModelConfig:
    values = {
        "vocab_size": 256,
        "window": WINDOW,
        "n_memory": 4,
        "n_pauses": 4,
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 2,
        "d_ff": 128,
    }
    return ModelConfig.preset("tiny", **{**values, **overrides})


def small_model(**overrides) -> BakaLM:
    return BakaLM(small_config(**overrides)).eval()


def text_of_length(n_bytes: int, seed: int) -> str:
    """Words of text, n_bytes UTF-8 bytes long (with a two-byte character where one fits)."""
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "city"]
    rng = np.random.default_rng(seed)
    text = "é " if n_bytes >= 3 else ""
    while len(text.encode("utf-8")) < n_bytes:
        text += words[rng.integers(len(words))] + " "
    return text[: len(text) - (len(text.encode("utf-8")) - n_bytes)]


def byte_corpus(lengths: list[int]) -> TokenizedCorpus:
    texts = [text_of_length(length, seed) for seed, length in enumerate(lengths)]
    return TokenizedCorpus.from_token_lists([list(text.encode("utf-8")) for text in texts], 256, texts=texts)


def nll_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def direct_bakallm_nll(model: BakaLM, tokens: np.ndarray, segment: int) -> torch.Tensor:
    """Token NLLs of one article, each segment of `segment` inputs run alone from a fresh state in one call."""
    ids = torch.as_tensor(tokens.astype(np.int64))
    inputs, targets = ids[:-1], ids[1:]
    pieces = []
    with torch.no_grad():
        for start in range(0, len(inputs), segment):
            logits = model(inputs[None, start : start + segment]).logits[0]
            pieces.append(nll_of_logits(logits, targets[start : start + segment]))
    return torch.cat(pieces).double()


def test_figures_equal_those_computed_from_each_articles_logits():
    model = small_model()
    corpus = byte_corpus([53, 37])
    result = evaluate_bakallm(model, corpus, EvalSettings(n_ctx=WHOLE_ARTICLE, batch_size=2, device="cpu"))

    per_article = [direct_bakallm_nll(model, corpus.document(i), WHOLE_ARTICLE) for i in range(2)]
    total = float(sum(nll.sum() for nll in per_article))
    tokens = 52 + 36
    assert result.tokens == tokens and result.n_articles == 2 and result.nan_count == 0
    assert result.loss == pytest.approx(total / tokens, abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert result.bpb == pytest.approx(total / math.log(2) / (53 + 37), abs=1e-5)
    n_words = sum(int(n) for n in corpus.n_words)
    assert result.word_ppl == pytest.approx(math.exp(total / n_words), rel=1e-5)
    assert result.legacy_loss == pytest.approx(float(np.mean([nll.mean() for nll in per_article])), abs=1e-5)
    assert result.legacy_loss != pytest.approx(
        result.loss, abs=1e-6
    )  # the articles differ in length, so the means differ


def test_progress_bars_stay_out_of_a_log_file(capsys):
    # Under pytest standard error is not a terminal, as when a run's output goes to a log file.
    evaluate_bakallm(
        small_model(),
        byte_corpus([53, 37]),
        EvalSettings(n_ctx=WHOLE_ARTICLE, batch_size=2, device="cpu", progress=True),
    )
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "scoring" not in captured.err


def test_batch_size_does_not_change_the_result():
    model = small_model()
    corpus = byte_corpus([70, 5, 45, 100, 1, 33, 2, 17])
    # 16 rows: more than there are articles.
    results = [
        evaluate_bakallm(model, corpus, EvalSettings(n_ctx=WHOLE_ARTICLE, batch_size=size, device="cpu"))
        for size in (1, 3, 16)
    ]
    assert [r.tokens for r in results] == [69 + 4 + 44 + 99 + 32 + 1 + 16] * 3
    assert [r.n_articles for r in results] == [7] * 3  # the one-token article has nothing to score
    for other in results[1:]:
        assert other.loss == pytest.approx(results[0].loss, abs=1e-5)
        assert other.legacy_loss == pytest.approx(results[0].legacy_loss, abs=1e-5)


@pytest.mark.parametrize("n_ctx", [WINDOW, 3 * WINDOW, 3 * WINDOW // 2])
def test_state_is_reset_every_n_ctx_tokens(n_ctx):
    model = small_model()
    corpus = byte_corpus([90, 61])
    result = evaluate_bakallm(model, corpus, EvalSettings(n_ctx=n_ctx, batch_size=2, device="cpu"))
    expected = torch.cat([direct_bakallm_nll(model, corpus.document(i), n_ctx) for i in range(2)])
    assert result.loss == pytest.approx(float(expected.mean()), abs=1e-5)

    whole = evaluate_bakallm(model, corpus, EvalSettings(n_ctx=WHOLE_ARTICLE, batch_size=2, device="cpu"))
    assert abs(whole.loss - result.loss) > 1e-4


@pytest.mark.parametrize("n_ctx", [WINDOW, WHOLE_ARTICLE])
def test_position_losses_equal_the_token_losses_bucketed_by_hand(n_ctx):
    model = small_model()
    corpus = byte_corpus([90, 61])
    buckets = (0, WINDOW, 40)
    result = evaluate_bakallm(
        model, corpus, EvalSettings(n_ctx=n_ctx, batch_size=2, device="cpu", position_buckets=buckets)
    )

    per_article = [direct_bakallm_nll(model, corpus.document(i), n_ctx).numpy() for i in range(2)]
    # Article 0 has 89 inputs (positions 0..88), article 1 has 60: buckets [0, 16), [16, 40), [40, ...).
    expected_tokens = [16 + 16, 24 + 24, 49 + 20]
    pieces = [[nll[:16], nll[16:40], nll[40:]] for nll in per_article]
    expected_losses = [float(np.concatenate([pieces[0][k], pieces[1][k]]).mean()) for k in range(3)]
    assert [(b.start, b.stop) for b in result.position_losses] == [(0, 16), (16, 40), (40, None)]
    assert [b.tokens for b in result.position_losses] == expected_tokens
    assert [b.loss for b in result.position_losses] == pytest.approx(expected_losses, abs=1e-5)
    total = sum(b.loss * b.tokens for b in result.position_losses) / sum(expected_tokens)
    assert total == pytest.approx(result.loss, abs=1e-5)


def test_the_first_window_scores_alike_whole_and_reset_and_later_positions_differ():
    model = small_model()
    corpus = byte_corpus([90, 61])
    whole = evaluate_bakallm(
        model, corpus, EvalSettings(n_ctx=WHOLE_ARTICLE, batch_size=2, device="cpu", position_buckets=(0, WINDOW))
    )
    reset = evaluate_bakallm(
        model, corpus, EvalSettings(n_ctx=WINDOW, batch_size=2, device="cpu", position_buckets=(0, WINDOW))
    )
    assert whole.position_losses[0].loss == pytest.approx(reset.position_losses[0].loss, abs=1e-6)
    assert abs(whole.position_losses[1].loss - reset.position_losses[1].loss) > 1e-4


@pytest.mark.parametrize("starts", [(), (1, 512), (0, 512, 512), (0, 2048, 512)])
def test_position_buckets_must_start_at_zero_and_rise(starts):
    with pytest.raises(UserError, match="must start at 0 and rise strictly"):
        ArticleLossTally(3, position_buckets=starts)


def test_n_ctx_smaller_than_the_window_is_refused():
    with pytest.raises(UserError, match="smaller than the model's window of 16 tokens"):
        evaluate_bakallm(small_model(), byte_corpus([40]), EvalSettings(n_ctx=WINDOW - 1, batch_size=1, device="cpu"))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    with pytest.raises(UserError, match="vocabulary holds only 200"):
        evaluate_bakallm(
            small_model(vocab_size=200), byte_corpus([40]), EvalSettings(n_ctx=WINDOW, batch_size=1, device="cpu")
        )


def test_a_corpus_without_two_token_articles_is_refused():
    corpus = TokenizedCorpus.from_token_lists([[1], [2]], 256)
    with pytest.raises(UserError, match="nothing to score"):
        evaluate_bakallm(small_model(), corpus, EvalSettings(n_ctx=WINDOW, batch_size=1, device="cpu"))


def test_long_articles_stream_one_window_per_call():
    model = small_model()
    lengths = []
    original_forward = model.forward

    def recording_forward(input_ids, **kwargs):
        lengths.append(input_ids.shape[1])
        assert kwargs["targets"].shape == input_ids.shape and not kwargs["return_logits"]  # the targets' losses only
        return original_forward(input_ids, **kwargs)

    model.forward = recording_forward
    evaluate_bakallm(model, byte_corpus([300]), EvalSettings(n_ctx=WHOLE_ARTICLE, batch_size=1, device="cpu"))
    assert lengths == [WINDOW] * -(-299 // WINDOW)  # the last window is padded, so every call has one shape


def test_tally_leaves_nan_out_and_reports_it():
    corpus = TokenizedCorpus.from_token_lists([[1, 2, 3, 4], [5, 6, 7]], 10, texts=["ab cd", "efg"])
    tally = ArticleLossTally(len(corpus), position_buckets=(0, 2))
    nll = torch.tensor([[1.0, math.nan, 3.0], [2.0, 4.0, 0.0]])
    scored = torch.tensor([[True, True, True], [True, True, False]])
    positions = torch.arange(3).expand(2, 3)
    assert tally.add([0, 1], nll, scored, positions) == 5
    result = tally.result(corpus, seconds=2.0, peak_memory_bytes=None)
    assert result.tokens == 5 and result.nan_count == 1 and result.n_articles == 2
    assert result.loss == pytest.approx(10 / 4)
    assert result.legacy_loss == pytest.approx((4 / 2 + 6 / 2) / 2)
    assert result.bpb == pytest.approx(10 / math.log(2) / (5 + 3))
    assert result.word_ppl == pytest.approx(math.exp(10 / 3))
    assert result.tokens_per_s == pytest.approx(2.5)
    # Positions 0-1: 1, 2 and 4 (the NaN left out); position 2 and beyond: 3 (row 1's third token is not scored).
    first, rest = result.position_losses
    assert (first.start, first.stop, first.tokens, first.loss) == (0, 2, 3, pytest.approx(7 / 3))
    assert (rest.start, rest.stop, rest.tokens, rest.loss, rest.label) == (2, None, 1, pytest.approx(3.0), "2+")


def test_corpus_without_texts_has_no_byte_or_word_figures():
    result = evaluate_bakallm(
        small_model(),
        TokenizedCorpus.from_token_lists([[1, 2, 3]], 256),
        EvalSettings(n_ctx=WINDOW, batch_size=1, device="cpu"),
    )
    assert result.bpb is None and result.word_ppl is None and result.tokens == 2


# ----- Hugging Face baselines -----


def save_random_gpt_neox(folder, **config_values):
    """A random-weight GPT-NeoX (Pythia's architecture) saved to `folder` as a Hugging Face model."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(**config_values)).save_pretrained(folder)
    return folder


HF_CONFIG = {
    "vocab_size": 300,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "rotary_pct": 0.25,
}


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_random_gpt_neox(tmp_path_factory.mktemp("hf-model"), **HF_CONFIG)


@pytest.mark.parametrize("n_tokens", [1, 2, 3, 17, 64, 65, 100])
@pytest.mark.parametrize("n_ctx, stride", [(16, 8), (16, 16), (16, 1), (16, 5), (10, 7)])
def test_hf_windows_score_every_token_exactly_once(n_tokens, n_ctx, stride):
    windows = list(hf_windows(0, n_tokens, n_ctx, stride))
    scored = [position for window in windows for position in range(window.first_scored, window.stop)]
    assert scored == list(range(n_tokens - 1))
    assert all(window.stop - window.start <= n_ctx and window.start <= window.first_scored for window in windows)
    assert [window.start for window in windows] == list(range(0, stride * len(windows), stride))


def test_hf_loss_equals_one_full_forward_when_n_ctx_covers_the_article(hf_model_dir):
    from transformers import AutoModelForCausalLM

    corpus = byte_corpus([60, 23, 41])
    result = evaluate_hf(hf_model_dir, corpus, EvalSettings(n_ctx=64, batch_size=2))

    model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        nll = []
        for index in range(len(corpus)):
            ids = torch.as_tensor(corpus.document(index).astype(np.int64))[None]
            nll.append(nll_of_logits(model(ids).logits[0, :-1], ids[0, 1:]))
    expected = torch.cat(nll).double()
    assert result.tokens == 59 + 22 + 40
    assert result.loss == pytest.approx(float(expected.mean()), abs=1e-5)
    assert result.legacy_loss == pytest.approx(float(np.mean([n.double().mean() for n in nll])), abs=1e-5)
    # Inputs at positions 0-15 of each article, then 16 and beyond (HF windows count positions from the article's start too).
    by_hand = [torch.cat([n[:16] for n in nll]).double().mean(), torch.cat([n[16:] for n in nll]).double().mean()]
    bucketed = evaluate_hf(
        hf_model_dir, corpus, EvalSettings(n_ctx=64, batch_size=2, position_buckets=(0, 16))
    ).position_losses
    assert [b.tokens for b in bucketed] == [48, 59 + 22 + 40 - 48]
    assert [b.loss for b in bucketed] == pytest.approx([float(value) for value in by_hand], abs=1e-5)


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_hf_strides_score_every_token_and_batching_agrees(hf_model_dir, stride):
    corpus = byte_corpus([60, 23, 41, 2])
    one = evaluate_hf(hf_model_dir, corpus, EvalSettings(n_ctx=16, stride=stride, batch_size=1))
    batched = evaluate_hf(hf_model_dir, corpus, EvalSettings(n_ctx=16, stride=stride, batch_size=3))
    assert one.tokens == batched.tokens == 59 + 22 + 40 + 1
    assert batched.loss == pytest.approx(one.loss, abs=1e-5)


def test_hf_refuses_a_stride_beyond_n_ctx_and_a_context_beyond_the_model(hf_model_dir):
    corpus = byte_corpus([30])
    with pytest.raises(UserError, match="stride must lie between 1 and n_ctx"):
        evaluate_hf(hf_model_dir, corpus, EvalSettings(n_ctx=16, stride=17))
    with pytest.raises(UserError, match="exceeds the 128 positions"):
        evaluate_hf(hf_model_dir, corpus, EvalSettings(n_ctx=256))


@pytest.mark.parametrize("stride", [3, 8])
def test_hf_window_losses_equal_a_plain_model_call_per_window(hf_model_dir, stride):
    """Windows of n_ctx inputs every `stride` tokens, each run alone; each prediction counts in the first window that makes it."""
    from transformers import AutoModelForCausalLM

    n_ctx = 8
    corpus = byte_corpus([30, 13, 9])
    model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).eval()
    nll, window_lengths = [], []
    for index in range(len(corpus)):
        ids = torch.as_tensor(corpus.document(index).astype(np.int64))
        n_inputs = len(ids) - 1
        lengths, start, scored_until = [], 0, 0
        while scored_until < n_inputs:
            inputs = ids[start : min(start + n_ctx, n_inputs)]
            with torch.no_grad():
                window_nll = nll_of_logits(model(inputs[None]).logits[0], ids[start + 1 : start + 1 + len(inputs)])
            nll.append(window_nll[scored_until - start :])
            lengths.append(len(inputs))
            scored_until, start = start + len(inputs), start + stride
        window_lengths.append(lengths)
        assert [(w.start, w.stop - w.start) for w in hf_windows(index, len(ids), n_ctx, stride)] == [
            (k * stride, length) for k, length in enumerate(lengths)
        ]
    # Every window but an article's last is n_ctx long.
    assert all(length == n_ctx for lengths in window_lengths for length in lengths[:-1])
    assert window_lengths[1] == ([8, 8, 6] if stride == 3 else [8, 4])
    expected = torch.cat(nll).double()
    assert len(expected) == 29 + 12 + 8
    result = evaluate_hf(hf_model_dir, corpus, EvalSettings(n_ctx=n_ctx, stride=stride, batch_size=2))
    assert result.tokens == len(expected)
    assert result.loss == pytest.approx(float(expected.mean()), abs=1e-5)
