"""Generation: incremental decoding equals the full forward, sampling, stop strings, streaming."""

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.data.tokenizers import ByteTokenizer
from bakallm.generation import IncrementalReader, Sampling, generate, generate_text, sample_next

VOCAB = 256
WINDOW = 16


def small_config(**changes) -> ModelConfig:
    # The tiny preset, shrunk for speed, with pauses and memory on (spacing 4).
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, window=WINDOW, n_memory=4, n_pauses=4)
    values.update(changes)
    return ModelConfig.preset("tiny", **values)


def model_of(**changes) -> BakaLM:
    torch.manual_seed(0)
    model = BakaLM(small_config(**changes)).eval()
    with torch.no_grad():  # larger write slots, pauses and cache gate than the init, so that a slip shows
        model.write_slots.normal_(0, 1)
        model.pause.normal_(0, 1)
        if model.document_cache is not None:
            for name, parameter in model.document_cache.named_parameters():
                if "weight" in name:
                    parameter.normal_(0, 1)
                else:
                    parameter.zero_()
    return model


def assert_states_equal(got, want):
    for name, g, w in zip(("memory", "has_past"), (got.memory, got.has_past), (want.memory, want.has_past)):
        assert g.shape == w.shape, name
    torch.testing.assert_close(got.memory, want.memory, rtol=0, atol=1e-4)
    assert torch.equal(got.has_past, want.has_past)
    assert (got.token_counts is None) == (want.token_counts is None)
    if got.token_counts is not None:
        assert torch.equal(got.token_counts, want.token_counts)
    for g, w in zip(got.ngram_keys + got.ngram_counts, want.ngram_keys + want.ngram_counts, strict=True):
        assert torch.equal(g, w)
    for name in ("keys", "values", "conv", "ssm"):
        for g, w in zip(getattr(got, name), getattr(want, name), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


VARIANTS = {
    "pauses+memory": {},
    "no pauses, no memory": {"n_pauses": 0, "n_memory": 0},
    "memory only": {"n_pauses": 0},
    "pauses only, no xl cache": {"n_memory": 0, "xl_cache": False},
    "mamba restarted per window": {"carry_mamba_state": False},
    "document cache": {"document_cache": True},
    "n-gram document cache": {"document_cache": True, "document_cache_order": 3},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_length", [1, WINDOW - 1, WINDOW, WINDOW + 1, 7 * WINDOW // 2])
def test_incremental_decoding_equals_the_full_forward(variant, prompt_length, one_torch_thread):
    model = model_of(**VARIANTS[variant])
    total = prompt_length + 2 * WINDOW + 3  # decoding crosses two window ends
    ids = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(prompt_length))
    with torch.no_grad():
        full_logits = model(ids).logits
        reader = IncrementalReader(model, batch_size=2)
        logits = reader.read(ids[:, :prompt_length])
        torch.testing.assert_close(logits, model(ids[:, :prompt_length]).logits[:, -1], rtol=0, atol=1e-4)
        for length in range(prompt_length + 1, total + 1):
            logits = reader.read(ids[:, length - 1 : length])
            torch.testing.assert_close(
                logits, full_logits[:, length - 1], rtol=0, atol=1e-4, msg=lambda m: f"after {length} tokens: {m}"
            )
            if length % WINDOW == 0:
                assert reader.tokens_in_window == 0
                assert_states_equal(reader.state, model(ids[:, :length]).state)


def test_reading_in_uneven_pieces_gives_the_same_logits_and_state(one_torch_thread):
    model = model_of()
    ids = torch.randint(0, VOCAB, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reader = IncrementalReader(model, batch_size=1)
        for start, stop in ((0, 5), (5, 21), (21, 22), (22, 3 * WINDOW)):
            logits = reader.read(ids[:, start:stop])
        out = model(ids)
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=0, atol=1e-4)
    assert_states_equal(reader.state, out.state)


def test_greedy_generation_follows_the_argmax_of_the_full_forward(one_torch_thread):
    model = model_of()
    prompt = torch.randint(0, VOCAB, (WINDOW + 3,), generator=torch.Generator().manual_seed(4)).tolist()
    new = generate(model, [prompt], max_new_tokens=2 * WINDOW, sampling=Sampling(temperature=0))[0]
    assert len(new) == 2 * WINDOW
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0]
    expected = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert new == expected


def test_a_batch_of_prompts_gives_what_each_prompt_gives_alone(one_torch_thread):
    model = model_of()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]]
    greedy = Sampling(temperature=0)
    together = generate(model, prompts, max_new_tokens=20, sampling=greedy)
    alone = [generate(model, [prompt], max_new_tokens=20, sampling=greedy)[0] for prompt in prompts]
    assert together == alone


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others(one_torch_thread):
    model = model_of()
    runs = [generate(model, [[1, 2, 3]], 40, Sampling(temperature=1.5, seed=seed))[0] for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1).repeat(500, 1)
    generator = torch.Generator().manual_seed(0)
    top_2 = sample_next(logits, Sampling(temperature=1.0, top_k=2), generator)
    assert set(top_2.tolist()) == {0, 1}
    probabilities = logits[0].softmax(-1)
    # top_p just above p0 keeps tokens 0 and 1 (the first that reach it), never token 2.
    top_p = sample_next(logits, Sampling(temperature=1.0, top_p=float(probabilities[0]) + 0.01), generator)
    assert set(top_p.tolist()) == {0, 1}
    assert sample_next(logits, Sampling(temperature=1.0, top_p=0.1), generator).eq(0).all()
    assert sample_next(logits[:1], Sampling(temperature=0)).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


class ScriptedModel(BakaLM):
    """Writes a fixed byte string whatever it reads, to test text handling."""

    def __init__(self, text: bytes):
        super().__init__(small_config())
        self.script = list(text)
        self.calls = 0

    def logits(self, hidden, state=None):
        index = min(self.calls, len(self.script) - 1)
        self.calls += 1
        out = torch.full((*hidden.shape[:-1], VOCAB), -10.0)
        out[..., self.script[index]] = 10.0
        return out


def test_stop_strings_cut_the_text_and_streamed_pieces_add_up_to_it(one_torch_thread):
    script = "héllo wörld. STOP and more".encode()
    pieces = []
    text = generate_text(
        ScriptedModel(script),
        ByteTokenizer(),
        ["x"],
        max_new_tokens=100,
        sampling=Sampling(temperature=0),
        stop=["STOP"],
        on_text=lambda index, piece: pieces.append(piece),
    )[0]
    assert text == "héllo wörld. "
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)  # a cut two-byte character is never shown
    without_stop = generate_text(
        ScriptedModel(script), ByteTokenizer(), ["x"], max_new_tokens=5, sampling=Sampling(temperature=0)
    )[0]
    assert without_stop == "héll"  # five bytes


# ----- bakallm generate -----


@pytest.fixture
def run_dir(tmp_path):
    from bakallm.training.checkpoint import savable_weights, save_checkpoint, write_run_config

    model = model_of()
    path = tmp_path / "run"
    write_run_config(path, model.config.to_dict(), {"tokenizer": "bytes"})
    save_checkpoint(
        path,
        "step-00000001",
        savable_weights(model),
        torch.optim.AdamW(model.parameters()).state_dict(),
        trainer_state={},
        recurrent_state=None,
        rng_state={},
        keep_last=1,
    )
    return path


def test_generate_command_streams_the_continuation_of_the_api(run_dir, tmp_path, capsys, one_torch_thread):
    from bakallm.cli import main

    prompt = "The lobster " * 5  # 60 bytes: the prompt spans windows
    expected = generate_text(model_of(), ByteTokenizer(), [prompt], 30, Sampling(temperature=0))[0]
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "30", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    seeded = [
        "generate",
        str(run_dir),
        "--prompt-file",
        str(tmp_path / "prompt.txt"),
        "--max-new-tokens",
        "30",
        "--seed",
        "3",
    ]
    assert main(seeded) == 0
    first = capsys.readouterr().out
    assert main(seeded) == 0
    assert capsys.readouterr().out == first


def test_generate_command_errors_are_one_sentence(run_dir, tmp_path, capsys):
    from bakallm.cli import main

    assert main(["generate", str(run_dir), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "Cannot read --prompt-file" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "0"]) == 2
    error = capsys.readouterr().err
    assert "top_p must be in (0, 1]" in error and "Traceback" not in error
    for arguments, message in (
        (["--threads", "0"], "--threads must be at least 1"),
        (["--stop", ""], "--stop was given an empty text"),
    ):
        assert main(["generate", str(run_dir), "--prompt", "x", *arguments]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["generate", str(run_dir), "--prompt-file", str(binary)]) == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error and len(error.splitlines()) == 1
