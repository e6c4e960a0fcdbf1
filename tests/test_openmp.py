"""bakallm.openmp: the OpenMP barrier spin that bakallm's commands shorten before torch loads."""

import os
import subprocess
import sys

import pytest

from bakallm.cli import main
from bakallm.openmp import SPIN_COUNT, shorten_openmp_spin


def test_it_sets_the_spin_count_unless_the_user_chose_a_waiting_policy():
    environment = {"PATH": "/bin"}
    assert shorten_openmp_spin(environment) and environment["GOMP_SPINCOUNT"] == str(SPIN_COUNT) == "100000"
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        environment = dict(chosen)
        assert not shorten_openmp_spin(environment) and environment == chosen


@pytest.mark.parametrize("given, expected", [(None, "100000"), ("300000", "300000")])
def test_the_command_line_sets_it_before_torch_loads(given, expected):
    environment = {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if given is not None:
        environment["GOMP_SPINCOUNT"] = given
    script = (
        "import os, sys\n"
        "from bakallm.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split()[-2:] == [expected, "False"]


def test_once_torch_is_loaded_the_command_line_leaves_the_environment_alone(monkeypatch, capsys):
    import torch  # noqa: F401  (loaded, as in this test process)

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "GOMP_SPINCOUNT" not in os.environ
