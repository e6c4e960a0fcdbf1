"""benchmarks/bench_cpu_fused.py: every compiled pass against its PyTorch operations, in one table."""

import pytest

from bakallm.kernels.cpu_build import compiled_module
from conftest import load_benchmark


@pytest.mark.skipif(isinstance(compiled_module(), str), reason="the CPU kernels do not build here")
def test_each_pass_s_saving_per_step_is_its_time_saved_times_its_calls(capsys):
    bench = load_benchmark("bench_cpu_fused")
    bench.main(["--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == [name for name, *_ in bench.PASSES]
    for line in lines:
        cells = line.strip("| ").split(" | ")
        pytorch, compiled, calls, saved = float(cells[2]), float(cells[3]), int(cells[5]), float(cells[6][:-3])
        assert saved == pytest.approx((pytorch - compiled) * calls, abs=0.01 * calls + 1)
