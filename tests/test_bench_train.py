"""benchmarks/bench_train.py: the GPT-NeoX it measures ours against."""

import sys

import pytest
import torch

from conftest import load_benchmark


def test_gpt_neox_is_built_in_float32_although_its_config_says_float16(shared_file, monkeypatch):
    config = shared_file("configs/pythia-70m-deduped/config.json")
    assert '"torch_dtype": "float16"' in config.read_text()  # what made the baseline train in float16
    monkeypatch.setenv("BAKALLM_PYTHIA_CONFIG", str(config))
    bench = load_benchmark("bench_train")
    with torch.device("meta"):
        model = bench.build_model(bench.PYTHIA, torch.device("meta"))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_every_bakallm_model_s_mfu_ratio_to_gpt_neox_is_printed(shared_file, monkeypatch, capsys):
    monkeypatch.setenv("BAKALLM_PYTHIA_CONFIG", str(shared_file("configs/pythia-70m-deduped/config.json")))
    bench = load_benchmark("bench_train")
    arguments = "--models tiny pythia-70m --ctx 32 --steps 1 --warmup-steps 0 --same-process --no-memory"
    monkeypatch.setattr(sys, "argv", ["bench_train.py", *arguments.split(), "--peak-tflops", "0.001"])
    bench.main()
    output = capsys.readouterr().out
    mfu = {
        row.split("|")[1].strip(): float(row.split("|")[-2].strip().rstrip("%").replace(",", ""))
        for row in output.splitlines()
        if row.startswith("| tiny") or row.startswith("| pythia-70m")
    }
    ratio_line = next(line for line in output.splitlines() if line.startswith("tiny / GPT-NeoX training MFU: "))
    assert float(ratio_line.rsplit(" ", 1)[1]) == pytest.approx(mfu["tiny"] / mfu["pythia-70m"], abs=0.006)
