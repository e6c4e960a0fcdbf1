"""A first run on any machine: the shipped books and tokenizer, the defaults that use them, the
start-up summary of `bakallm train`, and `bakallm first-run`."""

import math
import sqlite3

import numpy as np
import pytest

from bakallm.cli import main
from bakallm.commands.first_run import plain_transformer_fields, report, unigram_loss
from bakallm.data import embedded
from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.model.config import ModelConfig
from bakallm.model.network import BakaLM
from bakallm.training.arguments import TrainConfig


def test_the_shipped_books_and_tokenizer_load_by_name_with_no_data_folder():
    train = list(load_corpus(embedded.TRAIN_CORPUS))
    held_out = list(load_corpus(embedded.HELD_OUT_CORPUS))
    assert len(train) == 9 and len(held_out) == 1
    assert held_out[0].text.startswith("The Time Machine")
    assert not {document.text[:200] for document in train} & {held_out[0].text[:200]}
    # Held out for real: no training book shares the held-out book's author.
    assert not any("wells" in document.id for document in train)
    tokenizer = load_tokenizer(embedded.TOKENIZER)
    assert tokenizer.vocab_size == embedded.TOKENIZER_VOCAB_SIZE == 8192
    text = held_out[0].text[:5000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and 3 < len(text) / len(ids) < 5
    assert (embedded.BOOKS_FOLDER / "PROVENANCE.md").is_file()


def test_train_and_bench_default_to_the_shipped_books():
    from bakallm.commands.bench import DEFAULT_DATA

    config = TrainConfig()
    assert (config.data, config.tokenizer) == (embedded.TRAIN_CORPUS, embedded.TOKENIZER)
    assert DEFAULT_DATA == embedded.HELD_OUT_CORPUS
    # Stored as names, not as paths inside this installation.
    resolved = config.with_resolved_paths()
    assert (resolved.data, resolved.tokenizer) == (embedded.TRAIN_CORPUS, embedded.TOKENIZER)


def test_a_local_folder_of_the_same_name_wins_over_the_shipped_corpus(tmp_path, monkeypatch):
    folder = tmp_path / embedded.TRAIN_CORPUS
    folder.mkdir()
    (folder / "mine.txt").write_text("my own words", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert [document.text for document in load_corpus(embedded.TRAIN_CORPUS)] == ["my own words"]


def test_train_tokenizer_learns_a_byte_level_bpe_that_round_trips(tmp_path):
    text = "the cat sat on the mat. the dog sat on the log. " * 50
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    tokenizer = embedded.train_tokenizer([tmp_path / "a.txt"], vocab_size=300)
    ids = tokenizer.encode("the cat sat on the log. Ünïcode").ids
    assert tokenizer.decode(ids) == "the cat sat on the log. Ünïcode"
    assert 256 < tokenizer.get_vocab_size() <= 300
    assert len(tokenizer.encode(" the cat sat").ids) < len(" the cat sat")  # merges were learned


def test_unigram_loss_equals_the_hand_computed_value():
    held_out = TokenizedCorpus.from_token_lists([[0, 1, 1], [2, 0]], vocab_size=4)
    train = np.array([0, 0, 1, 1, 1, 3])
    # add-one counts 3, 4, 1, 2 over 10; targets: 1, 1 (first article) and 0 (second).
    expected = -(2 * math.log(0.4) + math.log(0.3)) / 3
    assert unigram_loss(train, held_out) == pytest.approx(expected)


def test_the_plain_transformer_has_the_size_of_the_preset_outside_its_embeddings():
    fields = plain_transformer_fields("tiny", 1000, 512)
    ours = BakaLM(ModelConfig.preset("tiny", vocab_size=1000)).num_parameters()
    plain = BakaLM(ModelConfig.preset("tiny", vocab_size=1000, **fields)).num_parameters()
    assert plain["embedding"] == ours["embedding"]
    assert plain["total"] - plain["embedding"] == pytest.approx(ours["total"] - ours["embedding"], rel=0.01)
    assert fields["d_ff"] > ModelConfig.preset("tiny", vocab_size=1000).d_ff  # the Mamba blocks' share went to the MLP
    assert not fields["mamba"] and not fields["xl_cache"] and fields["n_memory"] == 0 and fields["window"] == 512


def test_train_prints_what_the_run_will_do_and_resume_says_where_it_starts(tmp_path, capsys, small_train_args):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("abcdefgh " * 300, encoding="utf-8")  # 2,700 bytes
    args = small_train_args(
        tmp_path, corpus, "--max-steps", "3", "--lr", "0.001", "--save-every", "2", "--run-dir", str(tmp_path / "run")
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    counts = BakaLM(
        ModelConfig.preset(
            "tiny", vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=64, window=32, n_memory=2, n_pauses=2
        )
    ).num_parameters()
    assert "starting a new run" in out
    assert f"{counts['total'] / 1e6:.2f}M parameters, {counts['embedding'] / 1e6:.2f}M of them in embeddings" in out
    assert "cpu, float32, 1 thread\n" in out
    assert "corpus      corpus: 1 documents, 2,700 tokens of bytes (256 token types)" in out
    assert f"3 steps of 2 rows x 64 tokens = 128 tokens each: {3 * 128 / 2700:.2f} passes over the corpus" in out
    assert "cosine from 0.001 to 0.0001 over 3 steps, after 1 warm-up steps" in out
    assert f"saved in    {(tmp_path / 'run').resolve()} (every 2 steps" in out
    assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "4", "--no-progress"]) == 0
    assert "resuming from step 3: 1 steps to go" in capsys.readouterr().out


def test_the_first_run_report_lists_every_reading_by_position():
    from bakallm.evaluation.positions import PositionLoss

    positions = (PositionLoss(0, 512, 10, 5.0), PositionLoss(512, None, 20, 4.5))
    text = report(
        [("uniform guess", 9.01, ()), ("ours, read whole", 4.7, positions)],
        30,
        1000,
        ["ours: 3 steps"],
        "Once",
        " upon a time",
    )
    lines = text.splitlines()
    assert lines[:2] == ["Trained on books of 1,000 tokens:", "  ours: 3 steps"]
    assert lines[4].split() == ["loss", "0-512", "512+"]
    assert lines[5].split()[-1] == "9.010" and lines[6].split()[-3:] == ["4.700", "5.000", "4.500"]
    assert text.endswith("Once upon a time")


def test_first_run_trains_both_models_and_records_their_rows(tmp_path, capsys):
    db = tmp_path / "results.sqlite3"
    assert (
        main(
            [
                "first-run",
                "--minutes",
                "0.05",
                "--run-dir",
                str(tmp_path / "first"),
                "--db",
                str(db),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = (
        sqlite3.connect(db)
        .execute("SELECT model_name, loss, n_ctx FROM results WHERE study = 'first-run' ORDER BY id")
        .fetchall()
    )
    assert [name for name, _, _ in rows] == [
        "first-run/bakallm-tiny",
        "first-run/bakallm-tiny",
        "first-run/plain-transformer",
    ]
    uniform = math.log(8192)
    unigram = float(next(line for line in out.splitlines() if line.startswith("unigram")).split()[-1])
    assert unigram < uniform
    assert all(loss < uniform for _, loss, _ in rows)  # even a few steps learn the token frequencies
    assert "Sample (our model" in out
    # The folder is not reused: a second first run into it is refused, with nothing overwritten.
    assert main(["first-run", "--minutes", "0.05", "--run-dir", str(tmp_path / "first"), "--db", str(db)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_first_run_refuses_bad_minutes(capsys):
    assert main(["first-run", "--minutes", "0"]) == 2
    assert "--minutes must be a positive number" in capsys.readouterr().err
