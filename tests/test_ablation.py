"""`bakallm ablate`: a two-variant study (our model and a transformers baseline) trains, evaluates, resumes, tabulates."""

import json

import pytest
import torch
import yaml

from bakallm.ablation import DONE_FILE, StudyInterrupted, load_study, run_study, variant_train_config, write_corpus
from bakallm.cli import main
from bakallm.errors import UserError
from bakallm.results.db import ResultsDB

WORDS = "the cat sat on a mat and then it ran far away from the dog who barked at night".split()


def write_texts(folder, count, seed):
    folder.mkdir(parents=True)
    for index in range(count):
        words = [WORDS[(index * 7 + seed + position * 3) % len(WORDS)] for position in range(400)]
        (folder / f"doc{index}.txt").write_text(" ".join(words), encoding="utf-8")
    return folder


@pytest.fixture
def study_file(tmp_path, one_torch_thread):
    hf_config = tmp_path / "neox" / "config.json"
    hf_config.parent.mkdir()
    hf_config.write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 256,
                "vocab_size": 256,
                "rotary_pct": 0.25,
                "use_parallel_residual": True,
                "torch_dtype": "float16",
            }
        )
    )
    spec = {
        "study": "mini",
        "output": str(tmp_path / "runs"),
        "tokenizer": "bytes",
        "data": [str(write_texts(tmp_path / "train-a", 3, 0)), str(write_texts(tmp_path / "train-b", 2, 5))],
        "train_tokens": 2 * 128 * 3,
        "seed": 0,
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "window": 64, "n_memory": 2, "n_pauses": 2},
        "training": {
            "batch_size": 2,
            "train_ctx": 128,
            "lr": 0.001,
            "warmup_steps": 0,
            "save_every": 2,
            "log_every": 1,
        },
        "eval": {
            "corpora": [{"name": "held-out", "data": str(write_texts(tmp_path / "eval", 1, 3)), "max_characters": 600}],
            "contexts": ["whole", 64],
        },
        "variants": [
            {"name": "seed", "preset": "celp18-seed", "training": {"carry_state": False}},
            {"name": "neox", "hf_config": str(hf_config)},
        ],
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_runs_resumes_and_tabulates(study_file, tmp_path, capsys):
    db = tmp_path / "results.sqlite3"
    study = load_study(study_file)
    # Run the second variant first, as a second process sharing the study would.
    assert run_study(study, db, log=lambda message: None, only=["neox"]) == ["neox"]
    assert run_study(study, db, log=lambda message: None) == ["seed"]
    with ResultsDB(db) as results:
        recorded = results.rows(study="mini")
    rows = recorded[2:] + recorded[:2]  # in the study file's order
    # Two variants, one held-out corpus, two contexts: four rows; every variant trained 3 steps.
    assert [(row.extra["variant"], row.extra["context"]) for row in rows] == [
        ("seed", "whole"),
        ("seed", 64),
        ("neox", "whole"),
        ("neox", 64),
    ]
    assert all(row.extra["train_tokens"] == 3 * 2 * 128 - row.extra["train_tokens"] % 1 for row in rows)
    assert {row.model_kind for row in rows} == {"bakallm", "hf"}
    # The held-out text is cut to 600 characters: 599 scored byte tokens.
    assert all(row.tokens == 599 for row in rows)
    # Each row keeps the loss by position in the document, for `bakallm results --study --context-use`.
    expected_buckets = [(0, 512), (512, 87), (2048, 0), (8192, 0)]  # the 599 scored tokens by position
    assert all(
        [(bucket["start"], bucket["tokens"]) for bucket in row.position_losses] == expected_buckets for row in rows
    )
    neox_whole = rows[2]
    assert (neox_whole.n_ctx, neox_whole.stride) == (128, 64)  # a transformer reads at most its train_ctx
    assert (rows[3].n_ctx, rows[3].stride) == (64, 64)  # reset every 64: windows that do not overlap

    # Rerun: nothing is trained again and no row is added.
    assert run_study(load_study(study_file), db, log=lambda message: None) == []
    with ResultsDB(db) as results:
        assert len(results.rows(study="mini")) == 4

    # An unfinished variant resumes: drop its marker and it is evaluated again from its checkpoint.
    (tmp_path / "runs" / "neox" / DONE_FILE).unlink()
    assert run_study(load_study(study_file), db, log=lambda message: None) == ["neox"]

    # The same output folder with another budget is refused rather than mixed.
    changed = yaml.safe_load(study_file.read_text())
    changed["train_tokens"] *= 2
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(UserError, match="other settings \\(train_tokens differ\\)"):
        run_study(load_study(other), db, log=lambda message: None)

    capsys.readouterr()  # the variants' training log lines
    assert main(["results", "--study", "mini", "--db", str(db)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(
        "| variant | params | train tokens | train min | loss held-out @whole (delta) | loss held-out @64 (delta) |"
    )
    assert [line.split("|")[1].strip() for line in table[2:]] == ["seed", "neox"]
    assert "(+0.0000)" in table[2]  # the first variant is the reference of the deltas
    from bakallm.plotting import study_run_dirs

    assert [path.name for path in study_run_dirs(db, "mini")] == ["seed", "neox"]
    png = tmp_path / "mini.png"
    assert main(["plot", "study", "mini", "--db", str(db), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    neox_loss = rows[2].loss  # the rerun's figure replaces the first one; both score the same checkpoint
    assert f"{neox_loss:.4f}" in table[3]
    capsys.readouterr()  # the plot's "wrote ..." line
    assert main(["results", "--study", "mini", "--context-use", "--db", str(db)]) == 0
    context_use = capsys.readouterr().out.splitlines()
    assert context_use[0].startswith(
        "| model | benchmark | contexts | loss (longest) | loss (shortest) | gain 0-512 | gain 512-2K |"
    )
    seed_line = next(line for line in context_use if line.startswith("| mini/seed |")).split(" | ")
    seed_whole, seed_64 = rows[0], rows[1]
    assert seed_line[2:5] == ["1T vs 64", f"{seed_whole.loss:.4f}", f"{seed_64.loss:.4f}"]
    assert seed_line[-1] == f"{100 * (seed_64.loss - seed_whole.loss) / seed_64.loss:+.2f}% |"


def test_an_interrupted_variant_is_neither_evaluated_nor_marked_done_and_resumes(study_file, tmp_path, monkeypatch):
    import os
    import signal

    from bakallm.training.trainer import Trainer

    db = tmp_path / "results.sqlite3"
    real_train_step = Trainer.train_step
    signalled = []

    def train_step_then_sigterm(self):
        batches = real_train_step(self)
        if not signalled:
            signalled.append(self.step)
            os.kill(os.getpid(), signal.SIGTERM)  # what Ctrl-C or a job scheduler sends
        return batches

    monkeypatch.setattr(Trainer, "train_step", train_step_then_sigterm)
    with pytest.raises(StudyInterrupted, match="interrupted while training seed"):
        run_study(load_study(study_file), db, log=lambda message: None, only=["seed"])
    run_dir = tmp_path / "runs" / "seed"
    assert not (run_dir / DONE_FILE).exists()
    assert not db.exists() or ResultsDB(db).rows(study="mini") == []
    assert (run_dir / "LATEST").read_text().strip() == "step-00000001"

    assert run_study(load_study(study_file), db, log=lambda message: None, only=["seed"]) == ["seed"]
    done = json.loads((run_dir / DONE_FILE).read_text())
    assert done["interrupted"] is False
    with ResultsDB(db) as results:
        assert len(results.rows(study="mini")) == 2
    assert (run_dir / "LATEST").read_text().strip() == "step-00000003"


def test_hf_run_is_benchmarked_through_bench(study_file, tmp_path, capsys):
    db = tmp_path / "results.sqlite3"
    study = load_study(study_file)
    run_study(study, db, log=lambda message: None)
    capsys.readouterr()
    (held_out,) = (tmp_path / "runs" / "data").glob("eval-held-out-*.jsonl")
    code = main(
        [
            "bench",
            str(tmp_path / "runs" / "neox"),
            "--data",
            str(held_out),
            "--n-ctx",
            "128",
            "--db",
            str(db),
            "--json",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    with ResultsDB(db) as results:
        ablated = [
            r for r in results.rows(study="mini") if r.extra["variant"] == "neox" and r.extra["context"] == "whole"
        ][0]
    assert row["model_kind"] == "hf" and row["model_name"] == "neox"
    assert row["loss"] == pytest.approx(ablated.loss, abs=1e-5)


def test_study_file_errors_are_one_sentence(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "study": "x",
                "tokenizer": "bytes",
                "train_tokens": 10,
                "eval": {"corpora": [{"name": "a", "data": "a"}]},
                "variants": [{"name": "a", "preset": "tiny", "hf_config": "c"}],
            }
        )
    )
    with pytest.raises(UserError, match="exactly one of preset and hf_config"):
        load_study(path)


def test_a_variant_may_train_from_another_seed_to_measure_the_noise(study_file, tmp_path):
    from dataclasses import replace

    from bakallm.ablation import Variant, variant_train_config

    study = load_study(study_file)
    again = Variant("seed-1", "celp18-seed", training={"carry_state": False, "seed": 1})
    study = replace(study, variants=study.variants + [again])
    train_data = tmp_path / "train.jsonl"
    assert variant_train_config(study, study.variants[0], train_data).seed == 0  # the study's seed
    assert variant_train_config(study, again, train_data).seed == 1


def test_a_study_logged_to_a_file_has_no_transformers_progress_bars(study_file, tmp_path, capfd):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()  # as in a fresh process; another test may have turned them off
    assert main(["ablate", str(study_file), "--db", str(tmp_path / "results.sqlite3"), "--variants", "neox"]) == 0
    assert (
        "Writing model shards" not in capfd.readouterr().err
    )  # stderr is a pipe here, as in `bakallm ablate ... 2> log`


def test_a_study_with_a_recall_test_trains_on_the_recall_mix_and_records_recall_rows(study_file, tmp_path, capsys):
    spec = yaml.safe_load(study_file.read_text())
    filler = tmp_path / "filler"
    write_texts(filler, 2, 9)
    spec["training"].update(recall_every=100, recall_max_distance=128)
    spec["eval"]["recall"] = {
        "data": str(filler),
        "distances": [0.5, 2],
        "samples": 3,
        "window": 64,
        "contexts": ["whole", 64],
    }
    path = tmp_path / "recall.yaml"
    path.write_text(yaml.safe_dump(spec))
    db = tmp_path / "results.sqlite3"
    assert run_study(load_study(path), db, log=lambda message: None) == ["seed", "neox"]
    with ResultsDB(db) as results:
        recall_rows = results.rows(study="mini", task="recall")
    assert [(row.extra["variant"], row.extra["context"], row.n_ctx) for row in recall_rows] == [
        ("seed", "whole", 1 << 40),
        ("seed", 64, 64),
        ("neox", "whole", 128),
        ("neox", 64, 64),
    ]
    for row in recall_rows:
        assert [(score["distance_tokens"], score["samples"]) for score in row.recall] == [(32, 3), (128, 3)]
        assert row.tokens == 2 * 3 * 10  # two distances, three samples, ten answer bytes each
    assert main(["results", "--db", str(db), "--study", "mini"]) == 0
    listing = capsys.readouterr().out
    assert "Recall: exact answers" in listing and "mini/neox" in listing


def test_a_bad_recall_section_is_refused(study_file, tmp_path):
    spec = yaml.safe_load(study_file.read_text())
    for recall, message in (
        ({"distances": [1]}, "must be a mapping with data"),
        ({"data": "x", "distances": [0]}, "above zero"),
        ({"data": "x", "samples": 0}, "--samples must be at least 1"),
    ):
        spec["eval"]["recall"] = recall
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(UserError, match=message):
            load_study(path)


def test_a_later_stage_starts_from_an_earlier_variant_of_the_study(study_file, tmp_path):
    from safetensors.torch import load_file

    from bakallm.training import checkpoint as ckpt
    from bakallm.training.trainer import Trainer

    spec = yaml.safe_load(study_file.read_text())
    spec["variants"] = [
        {"name": "first", "preset": "tiny"},
        {"name": "second", "preset": "tiny", "training": {"init_from": "first"}},
    ]
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = load_study(path)
    train_data = write_corpus(study.train_sources, study.output / "data", "train")
    with pytest.raises(UserError, match="starts from variant first, which is not done"):
        variant_train_config(study, study.variants[1], train_data)
    assert run_study(study, tmp_path / "results.sqlite3", log=lambda message: None, only=["first"]) == ["first"]
    config = variant_train_config(study, study.variants[1], train_data)
    assert config.init_from == str(study.run_dir(study.variants[0]))
    trainer = Trainer(config)
    for name, tensor in load_file(ckpt.latest_checkpoint(study.run_dir(study.variants[0])) / ckpt.MODEL_FILE).items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"variants": [{"name": "../../escape", "preset": "tiny"}]}, "must be a plain file name"),
        ({"variants": [{"name": "data", "preset": "tiny"}]}, "which the study uses itself"),
        ({"variants": [{"name": ".hidden", "preset": "tiny"}]}, "must be a plain file name"),
        ({"eval": {"corpora": [{"name": "../x", "data": "y"}]}}, "held-out corpus name '../x'"),
        ({"eval": {"corpora": [{"name": "a", "data": "y"}, {"name": "a", "data": "z"}]}}, "each have their own name"),
        ({"evaluation": {}}, "unknown entries \\['evaluation'\\]"),
    ],
)
def test_names_in_a_study_file_are_checked(study_file, tmp_path, change, message):
    spec = {**yaml.safe_load(study_file.read_text()), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message):
        load_study(path)
    assert not (tmp_path / "escape").exists()


def test_a_missing_study_file_is_called_a_study_file(tmp_path, capsys):
    assert main(["ablate", str(tmp_path / "missing.yaml")]) == 2
    assert "Study file" in capsys.readouterr().err
