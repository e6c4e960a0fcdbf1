"""Odd or hostile input: NUL bytes, invalid UTF-8, whitespace only, one enormous line, a tokenizer
larger than the model's vocabulary. Each is trained on or refused in one sentence; nothing is
written outside the run directory and the token cache."""

import json

import pytest

from bakallm.cli import main


def _files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize(
    "content",
    [b"plain\x00text with\x00NUL bytes " * 200, b" \n\t \r\n" * 500, b"one line without any newline " * 400_000],
    ids=["NUL bytes", "whitespace only", "a 12 MB line"],
)
def test_odd_text_is_trained_on_and_nothing_lands_outside_the_run(tmp_path, content, capsys, small_train_args):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "odd.txt").write_bytes(content)
    before = _files(tmp_path)
    assert main(small_train_args(tmp_path, corpus, "--max-steps", "2", "--run-dir", str(tmp_path / "run"))) == 0, (
        capsys.readouterr().err
    )
    new = [
        path for path in _files(tmp_path) if path not in before and path != "small.json"
    ]  # the test's own model file
    assert new and all(path.split("/")[0] in ("run", "cache") for path in new), new
    assert (
        json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())["step"] == 2
    )


def test_invalid_utf8_is_refused_naming_the_file(tmp_path, capsys, small_train_args):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "bad.txt").write_bytes(b"fine text " * 50 + b"\xff\xfe broken " * 10)
    assert main(small_train_args(tmp_path, corpus, "--max-steps", "2", "--run-dir", str(tmp_path / "run"))) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error
        == f"bakallm train: error: {corpus / 'bad.txt'} is not valid UTF-8 text; convert the file to UTF-8 and try again."
    )
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_a_100_mb_line_is_trained_on(tmp_path, capsys, small_train_args):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "huge.txt").write_bytes(b"one line without any newline " * (100 * 2**20 // 29))
    assert main(small_train_args(tmp_path, corpus, "--max-steps", "2", "--run-dir", str(tmp_path / "run"))) == 0, (
        capsys.readouterr().err
    )


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_by_bench_and_resume(
    tmp_path, capsys, small_train_args
):
    from bakallm.data import embedded

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat. " * 100, encoding="utf-8")
    assert main(small_train_args(tmp_path, corpus, "--max-steps", "2", "--run-dir", str(tmp_path / "run"))) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "bench",
                str(tmp_path / "run"),
                "--data",
                str(corpus),
                "--tokenizer",
                embedded.TOKENIZER,
                "--db",
                str(tmp_path / "r.sqlite3"),
                "--no-progress",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "8192" in error and "256" in error
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "run"),
                "--tokenizer",
                embedded.TOKENIZER,
                "--max-steps",
                "3",
                "--no-progress",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--tokenizer" in error
