"""Data parallelism: N ranks x B rows train exactly like one process with N x B rows (DDP and FSDP2), resume exactly,
and resume on another split of the same rows. The ranks run as processes on gloo with torchrun's environment."""

import copy
import functools
import json
import multiprocessing
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bakallm.cli import main
from bakallm.data.batching import MODES, DocumentBatcher
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.training import checkpoint as ckpt

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed"),
    pytest.mark.usefixtures("one_torch_thread"),
]

WORDS = "the a cat dog sat ran on under mat tree and then quickly slowly big small red blue house river".split()
STEPS = 6
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A corpus of ten documents of different lengths (so rows end and refill at different steps) and a tiny model.

    The runs use two micro-batches per step, so gradient accumulation without all-reduce is part of every comparison.
    """
    folder = tmp_path_factory.mktemp("distributed")
    corpus = folder / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for index in range(10):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 70))]
        (corpus / f"doc{index:02d}.txt").write_text(" ".join(words) + ".", encoding="utf-8")
    (folder / "model.json").write_text(
        json.dumps({"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "window": 16, "n_memory": 2, "n_pauses": 2})
    )
    return folder


def train_args(workspace: Path, run_dir: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "tiny",
        "--model-config",
        str(workspace / "model.json"),
        "--data",
        str(workspace / "corpus"),
        "--tokenizer",
        "bytes",
        "--batch-size",
        str(batch_size),
        "--train-ctx",
        "32",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--shuffle",
        "--epochs",
        "100",
        "--decay-steps",
        str(STEPS),
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--grad-accum",
        "2",
        "--cache-dir",
        str(workspace / "cache"),
        "--save-every",
        "100",
        "--threads",
        "1",
        *extra,
    ]


def launch(
    world_size: int, command: Callable[[int], int], log_prefix: Path, timeout: float = 240
) -> list[tuple[int, str]]:
    """Runs `command(rank)` in `world_size` ranks with torchrun's environment; (exit status, output) per rank.

    The ranks are forked from this process, so they skip the seconds of importing torch that a fresh
    interpreter pays. Like torchrun, it stops the other ranks as soon as one fails.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs = [Path(f"{log_prefix}.rank{rank}.log") for rank in range(world_size)]
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, command, logs[rank]))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    while any(process.exitcode is None for process in processes):
        if time.monotonic() > deadline or any(process.exitcode not in (None, 0) for process in processes):
            for process in processes:
                if process.exitcode is None:
                    process.kill()
        time.sleep(0.05)
    return [(process.exitcode, log.read_text()) for process, log in zip(processes, logs)]


def _rank_main(rank: int, world_size: int, port: int, command: Callable[[int], int], log: Path) -> None:
    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    output = open(log, "w", buffering=1)
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    sys.stdout = sys.stderr = output
    code = command(rank)
    output.flush()
    os._exit(code)


def run_ranks(world_size: int, args: list[str], run_dir: Path) -> None:
    """`bakallm ARGS` in `world_size` ranks, as `torchrun --nproc-per-node WORLD_SIZE -m bakallm ARGS` runs it."""
    results = launch(world_size, lambda rank: main(args), log_prefix=run_dir)
    assert all(code == 0 for code, _ in results), "\n".join(
        f"rank {rank} exited {code}:\n{log}" for rank, (code, log) in enumerate(results)
    )


def step_losses(run_dir: Path) -> list[float]:
    with sqlite3.connect(run_dir / "metrics.sqlite3") as connection:
        return [row[0] for row in connection.execute("SELECT loss FROM steps ORDER BY step")]


def checkpoint_files(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    latest = ckpt.latest_checkpoint(run_dir)
    return load_file(latest / ckpt.MODEL_FILE), torch.load(latest / ckpt.OPTIMIZER_FILE, weights_only=True)


def assert_trains_like(reference: Path, run_dir: Path) -> None:
    expected, got = step_losses(reference), step_losses(run_dir)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(expected, got)) <= TOLERANCE, (expected, got)
    (weights, optimizer), (reference_weights, reference_optimizer) = (
        checkpoint_files(run_dir),
        checkpoint_files(reference),
    )
    assert weights.keys() == reference_weights.keys()
    assert max((weights[name] - tensor).abs().max().item() for name, tensor in reference_weights.items()) <= TOLERANCE
    assert optimizer["param_groups"] == reference_optimizer["param_groups"]
    for index, moments in reference_optimizer["state"].items():
        for name, tensor in moments.items():
            assert torch.allclose(optimizer["state"][index][name], tensor, rtol=1e-4, atol=TOLERANCE), (index, name)


@pytest.fixture(scope="module")
def single_process_run(workspace) -> Path:
    """The reference: one process with 4 rows for 6 steps."""
    run_dir = workspace / "one-process"
    assert main(train_args(workspace, run_dir, 4, "--max-steps", str(STEPS))) == 0
    return run_dir


@pytest.fixture(scope="module")
def two_rank_half_run(workspace) -> Path:
    """2 ranks x 2 rows, stopped after 3 of the 6 steps."""
    run_dir = workspace / "two-ranks-half"
    run_ranks(2, train_args(workspace, run_dir, 2, "--max-steps", str(STEPS // 2)), run_dir)
    return run_dir


def test_rank_rows_together_are_the_single_process_batches(workspace):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=17)
    corpus = TokenizedCorpus.from_token_lists([list(rng.integers(1, 50, size=n)) for n in lengths], vocab_size=50)
    for mode in MODES:
        whole = DocumentBatcher(corpus, 6, 16, mode=mode, shuffle=True, seed=3)
        ranks = [
            DocumentBatcher(corpus, 6, 16, mode=mode, shuffle=True, seed=3, rows=range(rank * 2, rank * 2 + 2))
            for rank in range(3)
        ]
        for _ in range(60):  # several epochs
            expected, parts = whole.next_batch(), [batcher.next_batch() for batcher in ranks]
            assert torch.equal(torch.cat([part.input_ids for part in parts]), expected.input_ids)
            assert torch.equal(torch.cat([part.targets for part in parts]), expected.targets)
            assert torch.equal(torch.cat([part.reset for part in parts]), expected.reset)
            assert sum(part.n_targets for part in parts) == expected.n_targets
            assert all(part.total_targets == expected.n_targets == expected.total_targets for part in parts)
            assert all((part.epoch, part.epoch_end) == (expected.epoch, expected.epoch_end) for part in parts)
        assert all(batcher.state_dict() == whole.state_dict() for batcher in ranks)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_of_two_rows_train_like_one_process_of_four(workspace, single_process_run, parallelism):
    run_dir = workspace / f"two-ranks-{parallelism}"
    run_ranks(
        2,
        train_args(workspace, run_dir, 2, "--max-steps", str(STEPS), *(["--fsdp"] if parallelism == "fsdp" else [])),
        run_dir,
    )
    assert_trains_like(single_process_run, run_dir)
    # Only rank 0 writes: one metrics log, one set of checkpoints, no leftovers.
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS:08d}"]


def test_a_transformers_model_trains_under_fsdp_like_one_process(workspace):
    """`--hf-config --fsdp` under torchrun: the model kind names the blocks to shard (its decoder layers)."""
    config = workspace / "neox.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "vocab_size": 256,
                "rotary_pct": 0.25,
            }
        )
    )

    def args(run_dir: Path, batch_size: int, *extra: str) -> list[str]:
        ours = train_args(workspace, run_dir, batch_size, "--max-steps", str(STEPS), *extra)
        at = ours.index("--preset")
        return (
            ours[:at] + ["--hf-config", str(config)] + ours[at + 4 :]
        )  # in place of --preset tiny --model-config FILE

    reference, sharded = workspace / "hf-one-process", workspace / "hf-two-ranks-fsdp"
    assert main(args(reference, 4)) == 0
    run_ranks(2, args(sharded, 2, "--fsdp"), sharded)
    assert_trains_like(reference, sharded)
    # The checkpoint's transformers folder is written from the gathered weights, not the shards.
    from bakallm.kinds import kind_named

    loaded = [kind_named("hf").load(run_dir, torch.device("cpu")).state_dict() for run_dir in (reference, sharded)]
    assert loaded[0].keys() == loaded[1].keys()
    assert max((loaded[1][name] - tensor).abs().max().item() for name, tensor in loaded[0].items()) <= TOLERANCE


def test_two_ranks_resume_exactly(workspace, single_process_run, two_rank_half_run):
    run_dir = workspace / "two-ranks-resumed"
    shutil.copytree(two_rank_half_run, run_dir)
    run_ranks(2, ["train", "--resume", str(run_dir), "--max-steps", str(STEPS), "--no-progress"], run_dir)
    assert_trains_like(single_process_run, run_dir)


def test_two_rank_run_resumes_in_one_process_with_the_same_rows(
    workspace, single_process_run, two_rank_half_run, capsys
):
    run_dir = workspace / "two-ranks-then-one"
    shutil.copytree(two_rank_half_run, run_dir)
    assert main(["train", "--resume", str(run_dir), "--max-steps", str(STEPS), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "4 rows per step (2 ranks x 2)" in error and "--batch-size 2 = 2" in error and len(error.splitlines()) == 1
    assert (
        main(["train", "--resume", str(run_dir), "--max-steps", str(STEPS), "--batch-size", "4", "--no-progress"]) == 0
    )
    assert_trains_like(single_process_run, run_dir)


def test_fsdp_without_torchrun_is_refused(workspace, capsys):
    assert main(train_args(workspace, workspace / "fsdp-alone", 2, "--max-steps", "1", "--fsdp")) == 2
    error = capsys.readouterr().err.strip()
    assert "torchrun" in error and len(error.splitlines()) == 1


def _train_where_rank_1_dies_at_its_second_save(args: list[str], rank: int) -> int:
    from bakallm.training.trainer import Trainer

    if rank != 1:
        return main(args)
    save = Trainer.save
    calls = []

    def save_or_die(self, name=None):
        calls.append(name)
        if len(calls) == 2:
            os._exit(1)
        return save(self, name)

    Trainer.save = save_or_die
    return main(args)


def test_a_rank_that_dies_while_saving_leaves_the_previous_checkpoint_and_the_run_resumes(
    workspace, single_process_run
):
    run_dir = workspace / "rank-dies"
    args = train_args(workspace, run_dir, 2, "--max-steps", str(STEPS), "--save-every", "2")
    results = launch(2, functools.partial(_train_where_rank_1_dies_at_its_second_save, args), log_prefix=run_dir)
    assert results[1][0] == 1 and results[0][0] != 0  # rank 0 fails in the collective, or is stopped by the launcher
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000002"
    assert not (run_dir / "checkpoints" / "step-00000004").exists()
    run_ranks(2, ["train", "--resume", str(run_dir), "--no-progress"], run_dir)
    assert_trains_like(single_process_run, run_dir)


def _accumulate_two_micro_batches(folder: Path, rank: int) -> int:
    """Saves the gradients after an unsynchronised and a synchronised micro-batch, and those of an unwrapped copy."""
    from bakallm import BakaLM, ModelConfig
    from bakallm.training.distributed import launch as start_ranks

    with start_ranks() as distributed:
        torch.manual_seed(0)
        model = BakaLM(ModelConfig.preset("tiny", **json.loads((folder / "model.json").read_text()), vocab_size=64))
        unwrapped = copy.deepcopy(model)
        wrapped = distributed.wrap(model, torch.device("cpu"), fsdp=False, units=list(model.layers))
        generator = torch.Generator().manual_seed(rank)  # each rank its own rows
        for synchronised in (False, True):
            ids = torch.randint(0, 64, (2, 16), generator=generator)
            with distributed.gradient_sync(wrapped, synchronised):
                wrapped(ids, targets=ids).loss.backward()
            unwrapped(ids, targets=ids).loss.backward()
            torch.save(
                [parameter.grad.clone() for parameter in model.parameters()],
                folder / f"synchronised-{synchronised}-rank{rank}.pt",
            )
        torch.save([parameter.grad for parameter in unwrapped.parameters()], folder / f"local-rank{rank}.pt")
    return 0


def test_accumulation_all_reduces_only_the_last_micro_batch(workspace):
    folder = workspace / "accumulation"
    folder.mkdir()
    shutil.copy(workspace / "model.json", folder)
    results = launch(2, functools.partial(_accumulate_two_micro_batches, folder), log_prefix=folder)
    assert all(code == 0 for code, _ in results), results
    first = [torch.load(folder / f"synchronised-False-rank{rank}.pt") for rank in range(2)]
    last = [torch.load(folder / f"synchronised-True-rank{rank}.pt") for rank in range(2)]
    local = [torch.load(folder / f"local-rank{rank}.pt") for rank in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(*first))  # not all-reduced: the ranks kept their own gradients
    for rank_0, rank_1, local_0, local_1 in zip(*last, *local):
        assert torch.equal(rank_0, rank_1)
        assert torch.allclose(rank_0, (local_0 + local_1) / 2, atol=1e-7)  # the average of both micro-batches' sums


def test_fsdp_on_a_torch_without_fully_shard_names_the_version_needed(monkeypatch):
    import torch.distributed.fsdp

    from bakallm.errors import UserError
    from bakallm.training.distributed import Distributed

    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")
    with pytest.raises(UserError, match=r"PyTorch 2\.6 or newer.*drop --fsdp"):
        Distributed(world_size=2, launched=True).wrap(torch.nn.Linear(2, 2), torch.device("cpu"), fsdp=True, units=[])


@pytest.mark.slow
def test_torchrun_starts_python_m_bakallm_as_the_readme_says(workspace, single_process_run):
    run_dir = workspace / "torchrun"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "bakallm",
        *train_args(workspace, run_dir, 2, "--max-steps", "2"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1])["steps"] == 2  # the summary, last
    # Printed by rank 0 only: the start-up summary once, the final summary once.
    assert sum(line.startswith("bakallm train: starting a new run") for line in lines) == 1
    assert sum(line.startswith('{"run_dir"') for line in lines) == 1
    assert max(abs(a - b) for a, b in zip(step_losses(single_process_run), step_losses(run_dir))) <= TOLERANCE
