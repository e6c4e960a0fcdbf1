"""`bakallm export`: a Hugging Face folder that transformers and bakallm load with the same logits."""

import json

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.cli import main
from bakallm.training.checkpoint import savable_weights, save_checkpoint, write_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(path, tokenizer: str, vocab_size: int, **changes) -> BakaLM:
    config = ModelConfig.preset(
        "tiny",
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        window=16,
        n_memory=4,
        n_pauses=4,
        **changes,
    )
    torch.manual_seed(0)
    model = BakaLM(config).eval()
    write_run_config(path, config.to_dict(), {"tokenizer": tokenizer})
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
    return model


@pytest.mark.parametrize(
    "changes",
    [{}, {"tie_embeddings": True}, {"document_cache": True}, {"document_cache": True, "document_cache_order": 3}],
    ids=["untied", "tied", "document-cache", "n-gram-cache"],
)
def test_exported_folder_loads_in_transformers_and_bakallm_with_equal_logits(tmp_path, changes):
    transformers = pytest.importorskip("transformers")
    model = make_run(tmp_path / "run", "bytes", 256, **changes)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "bakallm"
        and config["auto_map"]["AutoModelForCausalLM"] == "modeling_bakallm.BakaLMForCausalLM"
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (2, 40))  # windows 16: crosses two window ends
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(hf_model(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(BakaLM.from_pretrained(out).eval()(ids).logits, want, rtol=0, atol=1e-5)
        labels_loss = hf_model(ids, labels=ids).loss
    expected_loss = torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(labels_loss, expected_loss)
    # The library's generate re-reads the whole text each step; greedy, it writes what ours writes.
    from bakallm.generation import Sampling, generate

    hf_tokens = hf_model.generate(ids[:1, :5], max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert hf_tokens == generate(model, [ids[0, :5].tolist()], 20, Sampling(temperature=0))[0]


def test_exported_tokenizer_loads_without_running_the_folders_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    from bakallm.data import embedded
    from bakallm.data.tokenizers import load_tokenizer

    make_run(tmp_path / "run", embedded.TOKENIZER, embedded.TOKENIZER_VOCAB_SIZE)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    text = "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter to us."
    expected = load_tokenizer(embedded.TOKENIZER).encode(text)
    # The calls docs/generation.md gives: none asks whether to run modeling_bakallm.py.
    alone = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "export")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "export", trust_remote_code=False)
    for tokenizer in (alone, auto):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected


def test_push_to_hub_offline_is_one_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    make_run(tmp_path / "run", "bytes", 256)
    assert (
        main(["export", str(tmp_path / "run"), str(tmp_path / "export"), "--push-to-hub", "someone/bakallm-tiny"]) == 2
    )
    error = capsys.readouterr().err
    assert "Could not upload" in error and "someone/bakallm-tiny" in error and "Traceback" not in error
    assert (tmp_path / "export" / "model.safetensors").is_file()  # the folder is written before the upload


def test_export_refuses_a_run_directory_and_a_folder_with_files_unless_forced(tmp_path, capsys):
    make_run(tmp_path / "run", "bytes", 256)
    config_before = (tmp_path / "run" / "config.json").read_bytes()
    for target in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-00000001"):
        assert main(["export", str(tmp_path / "run"), str(target), "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "run directory or one of its checkpoints" in err[0]
    assert (tmp_path / "run" / "config.json").read_bytes() == config_before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["export", str(tmp_path / "run"), str(busy)]) == 2
    assert "already holds files" in capsys.readouterr().err and sorted(path.name for path in busy.iterdir()) == [
        "notes.txt"
    ]
    assert main(["export", str(tmp_path / "run"), str(busy), "--force"]) == 0
    assert (busy / "notes.txt").read_text() == "keep me" and (busy / "model.safetensors").is_file()
    plain_file_mode = (busy / "notes.txt").stat().st_mode & 0o777
    for name in ("model.safetensors", "config.json", "modeling_bakallm.py"):
        assert (busy / name).stat().st_mode & 0o777 == plain_file_mode, (
            name
        )  # the permissions any other writer's files get


def test_the_exported_folder_states_the_transformers_range_of_pyproject(tmp_path):
    """One source for the tested transformers releases: the `hf` extra of pyproject.toml."""
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    declared = next(
        Requirement(text)
        for text in pyproject["project"]["optional-dependencies"]["hf"]
        if text.startswith("transformers")
    )
    make_run(tmp_path / "run", "bytes", 256)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["bakallm_transformers_tested"] == str(
        declared.specifier
    )


def test_a_checkpoint_folder_loads_on_its_own(tmp_path):
    """A checkpoint folder holds its run's config.json: copied out of its run, it still loads."""
    import shutil

    model = make_run(tmp_path / "run", "bytes", 256)
    alone = tmp_path / "elsewhere" / "step-00000001"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000001", alone)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(BakaLM.from_pretrained(alone).eval()(ids).logits, model(ids).logits, rtol=0, atol=0)
