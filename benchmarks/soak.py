"""Kill-and-resume soak: train a small model while killing it at random moments (SIGKILL, or SIGTERM
that saves first), resume it each time, and check that its final weights equal an uninterrupted
run's, bit for bit.

    python benchmarks/soak.py [--kills 30] [--steps 3000] [--save-every 25] [--seed 0] [--workdir DIR]

Kills land anywhere: while the process starts, mid-step, while a checkpoint is written or LATEST is
replaced. Each kill's moment is drawn uniformly between --min-wait and --max-wait seconds after the
process starts. Everything runs on one thread (exact resume needs the same arithmetic every time).
Prints each kill, then the totals and whether the weights are equal; exit status 1 if they are not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "window": 32, "n_memory": 4, "n_pauses": 2}


def train_command(run_dir: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    common = ["--max-steps", str(args.steps), "--no-progress", "--threads", "1"]
    if resume:
        return [sys.executable, "-m", "bakallm", "train", "--resume", str(run_dir), *common]
    model_file = run_dir.parent / "soak-model.json"
    model_file.write_text(json.dumps(MODEL))
    return [
        sys.executable,
        "-m",
        "bakallm",
        "train",
        "--preset",
        "tiny",
        "--model-config",
        str(model_file),
        "--batch-size",
        "2",
        "--train-ctx",
        "64",
        "--lr",
        "0.003",
        "--warmup-steps",
        "5",
        "--save-every",
        str(args.save_every),
        "--keep-last",
        "2",
        "--seed",
        str(args.seed),
        "--run-dir",
        str(run_dir),
        "--cache-dir",
        str(run_dir.parent / "cache"),
        *common,
    ]


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "LATEST").is_file()


def final_weights(run_dir: Path):
    from safetensors.torch import load_file

    latest = (run_dir / "LATEST").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors"), latest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule and of the runs")
    parser.add_argument("--min-wait", type=float, default=2.0, help="earliest kill, seconds after a start")
    parser.add_argument("--max-wait", type=float, default=9.0, help="latest kill, seconds after a start")
    parser.add_argument("--workdir", type=Path, help="folder for the two runs (default: a temporary folder)")
    args = parser.parse_args()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bakallm-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reference, soaked = workdir / "uninterrupted", workdir / "soaked"
    started = time.perf_counter()
    subprocess.run(train_command(reference, args, resume=False), check=True, env=environment, stdout=subprocess.DEVNULL)
    reference_seconds = time.perf_counter() - started
    print(f"uninterrupted: {args.steps} steps in {reference_seconds:.0f} s")

    rng = random.Random(args.seed)
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    finished_early = starts = 0
    started = time.perf_counter()
    while sum(kills.values()) < args.kills:
        process = subprocess.Popen(
            train_command(soaked, args, resume=has_checkpoint(soaked)),
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        starts += 1
        wait = rng.uniform(args.min_wait, args.max_wait)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            name = rng.choice(["SIGKILL", "SIGTERM"])
            process.send_signal(getattr(signal, name))
            process.wait()
            kills[name] += 1
            step = (soaked / "LATEST").read_text().strip() if has_checkpoint(soaked) else "none"
            print(
                f"kill {sum(kills.values()):3d}: {name} after {wait:4.1f} s, exit {process.returncode}, latest checkpoint {step}"
            )
            continue
        if process.returncode != 0:
            print(f"the run failed by itself (exit {process.returncode}):\n{process.stderr.read()[-2000:]}")
            return 1
        finished_early += 1  # it reached --steps before its kill: start over from scratch for more kills
        if sum(kills.values()) < args.kills:
            print(f"the run finished before kill {sum(kills.values()) + 1}; starting it again from nothing")
            subprocess.run(["rm", "-rf", str(soaked)], check=True)
    if not has_checkpoint(soaked) or final_weights(soaked)[1] != f"step-{args.steps:08d}":
        subprocess.run(
            train_command(soaked, args, resume=has_checkpoint(soaked)),
            check=True,
            env=environment,
            stdout=subprocess.DEVNULL,
        )
    soak_seconds = time.perf_counter() - started
    expected, expected_name = final_weights(reference)
    actual, actual_name = final_weights(soaked)
    equal = (
        expected_name == actual_name
        and expected.keys() == actual.keys()
        and all((expected[k] == actual[k]).all() for k in expected)
    )
    print(
        f"\n{sum(kills.values())} kills ({kills['SIGKILL']} SIGKILL, {kills['SIGTERM']} SIGTERM) over {starts} starts "
        f"({finished_early} runs finished before their kill) in {soak_seconds:.0f} s; final checkpoint {actual_name}"
    )
    print(f"weights equal to the uninterrupted run's, bit for bit: {'yes' if equal else 'NO'}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
