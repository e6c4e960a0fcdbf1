import hashlib
import json
import shutil

import pytest
import torch

from bakallm import BakaLM
from bakallm.cli import main
from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.evaluation.evaluate import evaluate_bakallm
from bakallm.evaluation.settings import EvalSettings
from bakallm.kernels import scan
from bakallm.results.db import ResultsDB
from bakallm.training.checkpoint import MODEL_FILE, savable_weights, save_checkpoint, write_run_config
from test_evaluation import (
    HF_CONFIG,
    WINDOW,
    save_random_gpt_neox,
    small_config,
    text_of_length,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JSON_KEYS = {"loss", "ppl", "bpb", "word_ppl", "legacy_loss", "tokens", "n_ctx"}


def make_run(run_dir, **overrides):
    """A run directory with one checkpoint of an untrained model, tokenized with `bytes`."""
    config = small_config(**overrides)
    model = BakaLM(config)
    write_run_config(run_dir, config.to_dict(), {"tokenizer": "bytes"})
    save_checkpoint(
        run_dir,
        "step-00000001",
        savable_weights(model),
        torch.optim.AdamW(model.parameters()).state_dict(),
        trainer_state={},
        recurrent_state=None,
        rng_state={},
        keep_last=3,
    )


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "small-run"
    make_run(path)
    return path


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "articles"
    folder.mkdir()
    for index, length in enumerate([45, 70, 12]):
        (folder / f"{index}.txt").write_text(text_of_length(length, index), encoding="utf-8")
    return folder


def stored_rows(db_path):
    if not db_path.exists():
        return []
    with ResultsDB(db_path) as db:
        return db.rows()


def bench(capsys, *arguments):
    """(exit status, stdout lines, stderr lines) of `bakallm bench ARGUMENTS`."""
    status = main(["bench", *map(str, arguments), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def test_bench_of_a_run_prints_json_and_stores_the_row(tmp_path, run_dir, text_folder, capsys):
    db_path = tmp_path / "results.sqlite3"
    status, out, err = bench(
        capsys,
        run_dir,
        "--data",
        text_folder,
        "--json",
        "--db",
        db_path,
        "--cache-dir",
        tmp_path / "cache",
        "--note",
        "smoke",
    )
    assert status == 0, err
    printed = json.loads(out[-1])
    assert JSON_KEYS <= printed.keys()
    assert (
        out[-2].startswith(f"small-run: loss {printed['loss']:.4f}, ppl ")
        and f"saved as row {printed['id']} of {db_path}" in out[-2]
    )

    model = BakaLM.from_pretrained(run_dir)
    corpus = tokenize_corpus(load_corpus(str(text_folder)), load_tokenizer("bytes"), cache_dir=tmp_path / "cache")
    expected = evaluate_bakallm(model, corpus, EvalSettings(n_ctx=1_048_576, batch_size=1, device="cpu"))
    assert printed["loss"] == pytest.approx(expected.loss, abs=1e-5)
    assert printed["bpb"] == pytest.approx(expected.bpb, abs=1e-5)
    assert printed["tokens"] == expected.tokens == 44 + 69 + 11
    assert printed["n_ctx"] == 1_048_576

    (row,) = stored_rows(db_path)
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    assert row.id == printed["id"]
    assert (row.model_kind, row.model_name, row.benchmark, row.split) == (
        "bakallm",
        "small-run",
        str(text_folder),
        "validation",
    )
    assert row.checkpoint_path == str(checkpoint.resolve())
    assert row.checkpoint_hash == hashlib.sha256((checkpoint / MODEL_FILE).read_bytes()).hexdigest()
    assert row.arch_hash == hashlib.sha256(model.config.to_json().encode("utf-8")).hexdigest()
    assert (row.params_total, row.params_embedding) == (
        model.num_parameters()["total"],
        model.num_parameters()["embedding"],
    )
    assert (row.tokenizer, row.stride, row.note, row.nan_count) == (
        "bytes",
        None,
        "smoke",
        0,
    )  # the run's own tokenizer
    assert row.loss == pytest.approx(expected.loss, abs=1e-5) and row.legacy_loss == pytest.approx(
        expected.legacy_loss, abs=1e-5
    )
    assert row.extra["n_articles"] == 3


def test_bench_of_one_checkpoint_folder(tmp_path, run_dir, text_folder, capsys):
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    db_path = tmp_path / "results.sqlite3"
    status, _, err = bench(
        capsys,
        checkpoint,
        "--data",
        text_folder,
        "--db",
        db_path,
        "--cache-dir",
        tmp_path / "cache",
        "--n-ctx",
        2 * WINDOW,
    )
    assert status == 0, err
    (row,) = stored_rows(db_path)
    assert (row.model_name, row.checkpoint_path, row.n_ctx, row.tokenizer) == (
        "small-run",
        str(checkpoint.resolve()),
        2 * WINDOW,
        "bytes",
    )


def test_bench_of_a_hugging_face_model(tmp_path, text_folder, capsys):
    hf_model_dir = save_random_gpt_neox(tmp_path / "hf-model", **HF_CONFIG)
    db_path = tmp_path / "results.sqlite3"
    status, out, err = bench(
        capsys,
        "--hf",
        hf_model_dir,
        "--data",
        text_folder,
        "--tokenizer",
        "bytes",
        "--n-ctx",
        32,
        "--json",
        "--db",
        db_path,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert status == 0, err
    printed = json.loads(out[-1])
    (row,) = stored_rows(db_path)
    assert (row.model_kind, row.model_name, row.n_ctx, row.stride, row.tokens) == (
        "hf",
        str(hf_model_dir),
        32,
        16,
        44 + 69 + 11,
    )
    assert (
        row.params_embedding == 2 * HF_CONFIG["vocab_size"] * HF_CONFIG["hidden_size"]
    )  # input embedding and output head, not tied
    assert row.checkpoint_hash == hashlib.sha256((hf_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert printed["loss"] == pytest.approx(row.loss)


def test_a_hugging_face_folder_uses_its_own_tokenizer(tmp_path, text_folder, shared_file, capsys):
    folder = save_random_gpt_neox(
        tmp_path / "hf-with-tokenizer",
        vocab_size=50304,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    shutil.copy(shared_file("tokenizers/gpt-neox-20b/tokenizer.json"), folder / "tokenizer.json")
    db_path = tmp_path / "results.sqlite3"
    status, _, err = bench(
        capsys, "--hf", folder, "--data", text_folder, "--db", db_path, "--cache-dir", tmp_path / "cache"
    )
    assert status == 0, err
    (row,) = stored_rows(db_path)
    assert row.tokenizer == str((folder / "tokenizer.json").resolve())
    assert row.n_ctx == 64  # the default 2048 capped at the model's positions


def corrupt_weights(run_dir):
    (run_dir / "checkpoints" / "step-00000001" / MODEL_FILE).write_bytes(b"not a safetensors file")
    return run_dir


def config_only(run_dir):
    shutil.rmtree(run_dir / "checkpoints")
    return run_dir


@pytest.mark.parametrize(
    "prepare, options, message",
    [
        (lambda run_dir: run_dir.parent / "no-such-run", [], "does not exist"),
        (config_only, [], "holds no complete checkpoint"),
        (corrupt_weights, [], "is corrupted or unreadable"),
        (lambda run_dir: run_dir, ["--n-ctx", WINDOW - 1], "smaller than the model's window"),
        (lambda run_dir: run_dir, ["--split", "dev"], "Unknown split 'dev'"),
        (lambda run_dir: run_dir, ["--stride", 8], "--stride applies only to Hugging Face models"),
        (lambda run_dir: run_dir, ["--position-buckets", "0,64,32"], "must start at 0 and rise strictly"),
        (lambda run_dir: run_dir, ["--position-buckets", "0,1K"], "is not a comma-separated list of whole numbers"),
        (lambda run_dir: run_dir, ["--reset-every", 0], "--reset-every must be at least 1"),
    ],
)
def test_bad_input_fails_with_one_sentence(tmp_path, run_dir, text_folder, capsys, prepare, options, message):
    db_path = tmp_path / "results.sqlite3"
    status, _, err = bench(
        capsys, prepare(run_dir), "--data", text_folder, "--db", db_path, "--cache-dir", tmp_path / "cache", *options
    )
    assert status == 2
    assert len(err) == 1 and message in err[0], err
    assert stored_rows(db_path) == []


def test_a_tokenizer_too_large_for_the_model_fails_with_one_sentence(tmp_path, text_folder, capsys):
    run_dir = tmp_path / "small-vocab"
    make_run(run_dir, vocab_size=200)
    db_path = tmp_path / "results.sqlite3"
    status, _, err = bench(capsys, run_dir, "--data", text_folder, "--db", db_path, "--cache-dir", tmp_path / "cache")
    assert status == 2 and stored_rows(db_path) == []
    assert err == [
        "bakallm bench: error: The tokenizer bytes has 256 ids but the model's vocabulary holds only 200; pass the tokenizer the model was trained with (--tokenizer)."
    ]


def test_a_wrong_results_database_fails_before_scoring(tmp_path, run_dir, text_folder, capsys):
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("shopping list\n" * 200)
    status, _, err = bench(
        capsys, run_dir, "--data", text_folder, "--db", not_a_database, "--cache-dir", tmp_path / "cache"
    )
    assert status == 2 and len(err) == 1 and "is not a readable results database" in err[0]
    assert not (tmp_path / "cache").exists()  # it stopped before tokenizing


def test_scan_flag_picks_the_backend_and_keeps_the_loss(tmp_path, run_dir, text_folder, capsys, monkeypatch):
    reference_calls = []
    reference = scan.selective_scan_reference
    monkeypatch.setattr(
        scan, "selective_scan_reference", lambda *inputs: reference_calls.append(1) or reference(*inputs)
    )
    losses = {}
    for backend in ("blocked", "reference"):
        status, out, err = bench(
            capsys,
            run_dir,
            "--data",
            text_folder,
            "--json",
            "--db",
            tmp_path / f"{backend}.sqlite3",
            "--cache-dir",
            tmp_path / "cache",
            "--scan",
            backend,
        )
        assert status == 0, err
        assert bool(reference_calls) == (backend == "reference")
        losses[backend] = json.loads(out[-1])["loss"]
    assert losses["reference"] == pytest.approx(losses["blocked"], abs=1e-5)


def test_scan_flag_errors_are_one_sentence(tmp_path, run_dir, text_folder, capsys, monkeypatch):
    db_path = tmp_path / "results.sqlite3"
    status, _, err = bench(
        capsys, "--hf", "EleutherAI/pythia-70m", "--scan", "blocked", "--data", text_folder, "--db", db_path
    )
    assert status == 2 and len(err) == 1 and "--scan applies only to our models" in err[0], err
    monkeypatch.setattr(scan, "_triton", {"module": "No module named 'triton'"})
    status, _, err = bench(
        capsys, run_dir, "--scan", "triton", "--data", text_folder, "--db", db_path, "--cache-dir", tmp_path / "cache"
    )
    assert status == 2 and len(err) == 1 and "needs the triton package" in err[0], err
    assert stored_rows(db_path) == []


@pytest.mark.parametrize("task_options", [[], ["--task", "recall", "--distances", "1", "--samples", "2"]])
def test_precision_bfloat16_scores_under_autocast_and_is_stored(tmp_path, run_dir, text_folder, capsys, task_options):
    autocast_seen = []
    real_forward = BakaLM.forward

    def recording_forward(self, *args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real_forward(self, *args, **kwargs)

    db_path = tmp_path / "results.sqlite3"
    figures = {}
    for precision in ("float32", "bfloat16"):
        autocast_seen.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(BakaLM, "forward", recording_forward)
            status, out, err = bench(
                capsys,
                run_dir,
                "--data",
                text_folder,
                "--db",
                db_path,
                "--cache-dir",
                tmp_path / "cache",
                "--precision",
                precision,
                "--json",
                *task_options,
            )
        assert status == 0, err
        assert autocast_seen and set(autocast_seen) == {precision == "bfloat16"}
        figures[precision] = json.loads(out[-1])
    assert [row.extra["precision"] for row in stored_rows(db_path)] == ["float32", "bfloat16"]
    if not task_options:
        assert figures["bfloat16"]["loss"] == pytest.approx(figures["float32"]["loss"], rel=0.01)


def test_precision_flag_is_refused_for_hugging_face_models(tmp_path, text_folder, capsys):
    db_path = tmp_path / "results.sqlite3"
    status, _, err = bench(
        capsys, "--hf", "EleutherAI/pythia-70m", "--precision", "bfloat16", "--data", text_folder, "--db", db_path
    )
    assert status == 2 and len(err) == 1 and "--precision applies only to our models" in err[0], err
    assert stored_rows(db_path) == []


def test_reset_every_stores_both_rows_and_prints_the_loss_by_position(tmp_path, run_dir, text_folder, capsys):
    db_path = tmp_path / "results.sqlite3"
    status, out, err = bench(
        capsys,
        run_dir,
        "--data",
        text_folder,
        "--db",
        db_path,
        "--cache-dir",
        tmp_path / "cache",
        "--reset-every",
        WINDOW,
        "--position-buckets",
        f"0,{WINDOW},32",
    )
    assert status == 0, err
    whole, reset = stored_rows(db_path)
    assert (whole.n_ctx, reset.n_ctx) == (1_048_576, WINDOW)
    model = BakaLM.from_pretrained(run_dir)
    corpus = tokenize_corpus(load_corpus(str(text_folder)), load_tokenizer("bytes"), cache_dir=tmp_path / "cache")
    for row in (whole, reset):
        expected = evaluate_bakallm(
            model, corpus, EvalSettings(n_ctx=row.n_ctx, batch_size=1, device="cpu", position_buckets=(0, WINDOW, 32))
        )
        assert (
            [bucket["tokens"] for bucket in row.position_losses]
            == [b.tokens for b in expected.position_losses]
            == [16 + 16 + 11, 16 + 16, 12 + 37]
        )  # articles of 44, 69 and 11 inputs
        assert [bucket["loss"] for bucket in row.position_losses] == pytest.approx(
            [b.loss for b in expected.position_losses], abs=1e-5
        )
    gain = 100 * (reset.loss - whole.loss) / reset.loss
    assert (
        f"| all | 124 | {reset.loss:.4f} | {whole.loss:.4f} | {abs(gain):.2f}% {'lower' if gain >= 0 else 'higher'} |"
        in out
    )
    assert "| position | tokens | loss n_ctx 16 | loss n_ctx 1M | 1M vs 16 |" in out

    assert main(["results", "--db", str(db_path), "--context-use"]) == 0
    listed = capsys.readouterr().out
    assert f"small-run on {text_folder}/validation:" in listed and "| 0-16 | 43 |" in listed


def test_reset_every_is_refused_for_hugging_face_models(tmp_path, text_folder, capsys):
    status, _, err = bench(
        capsys, "--hf", tmp_path / "any", "--data", text_folder, "--reset-every", 16, "--db", tmp_path / "r.sqlite3"
    )
    assert status == 2 and "--reset-every applies only to our models" in err[0]
