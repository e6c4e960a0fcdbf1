"""The lm-evaluation-harness adapter scores WikiText articles exactly as `bakallm bench` does."""

import json
import logging
import re
import subprocess
import sys

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.cli import main
from bakallm.training.checkpoint import savable_weights, save_checkpoint, write_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ARTICLES = 3


@pytest.fixture
def wikitext_articles(shared_data, tmp_path):
    """The first few articles of the shared WikiText validation file, as a file of their own."""
    source = shared_data / "wikitext-103-raw" / "wiki.valid.raw"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    lines, headings = [], 0
    with source.open(encoding="utf-8") as file:
        for line in file:
            if re.fullmatch(r" = [^=].* = \n", line):
                headings += 1
                if headings > N_ARTICLES:
                    break
            lines.append(line)
    path = tmp_path / "articles.raw"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def neox_run(shared_data, tmp_path):
    tokenizer = shared_data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    if not tokenizer.is_file():
        pytest.skip(f"{tokenizer} is absent")
    config = ModelConfig.preset(
        "tiny", vocab_size=50277, d_model=32, n_layers=2, n_heads=2, d_ff=64, window=64, n_memory=4, n_pauses=4
    )
    torch.manual_seed(0)
    model = BakaLM(config)
    run_dir = tmp_path / "run"
    write_run_config(run_dir, config.to_dict(), {"tokenizer": str(tokenizer)})
    save_checkpoint(
        run_dir,
        "step-00000001",
        savable_weights(model),
        torch.optim.AdamW(model.parameters()).state_dict(),
        trainer_state={},
        recurrent_state=None,
        rng_state={},
        keep_last=1,
    )
    return run_dir


def test_harness_word_perplexity_and_bits_per_byte_equal_bench(neox_run, wikitext_articles, tmp_path, capsys, caplog):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install bakallm[eval])")
    from lm_eval.tasks import TaskManager

    import bakallm.harness.lm  # noqa: F401 (registers the model)
    from bakallm.harness import TASKS_DIR

    args = [
        "bench",
        str(neox_run),
        "--data",
        str(wikitext_articles),
        "--n-ctx",
        "1048576",
        "--json",
        "--no-progress",
        "--db",
        str(tmp_path / "results.sqlite3"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    tasks = TaskManager(include_path=str(TASKS_DIR), metadata={"path": str(wikitext_articles)})
    with caplog.at_level(logging.WARNING):
        results = lm_eval.simple_evaluate(
            model="bakallm", model_args={"path": str(neox_run)}, tasks=["bakallm_wikitext"], task_manager=tasks
        )
    # Our task declares everything the harness asks of it: a run prints no warning about it.
    assert not [record.getMessage() for record in caplog.records if "bakallm_wikitext" in record.getMessage()]
    figures = results["results"]["bakallm_wikitext"]
    assert results["n-samples"]["bakallm_wikitext"]["effective"] == N_ARTICLES
    assert figures["word_perplexity,none"] == pytest.approx(bench["word_ppl"], rel=1e-4)
    assert figures["bits_per_byte,none"] == pytest.approx(bench["bpb"], rel=1e-4)


def test_harness_answers_a_wrong_model_path_in_one_sentence(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install bakallm[eval])")
    command = [
        sys.executable,
        "-m",
        "bakallm.harness",
        "--model",
        "bakallm",
        "--model_args",
        f"path={tmp_path / 'missing'}",
        "--tasks",
        "bakallm_wikitext",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    assert finished.stderr.strip().splitlines()[-1] == (
        f"bakallm.harness: error: {tmp_path / 'missing'} does not exist; pass a run directory made by `bakallm train` or one of its checkpoint folders."
    )
