import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNING_IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")

# Without a GPU, Triton kernels run under Triton's interpreter. The variable is read when triton is
# first imported, and torch.compile imports triton too, so it is set before any test runs.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

# CI draws the same examples every run: a failure there is reproducible, never a lucky draw.
settings.register_profile("ci", derandomize=True, print_blob=True)
if RUNNING_IN_CI:
    settings.load_profile("ci")


def pytest_configure(config):
    """Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton makes that choice
    when a kernel is defined, so it is made here, before any test imports bakallm.kernels.triton_scan."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $BAKALLM_SHARED_DATA."""
    return Path(os.environ.get("BAKALLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder, or a skip when it is absent; prefer `shared_file`, which skips per missing file."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set BAKALLM_SHARED_DATA to run this test)")
    return path


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    """`shared_file("tokenizers/gpt2/tokenizer.json")`: that file of the shared data, or a skip that names it."""

    def find(relative_path: str) -> Path:
        path = shared_data_dir() / relative_path
        if not path.exists():
            pytest.skip(f"shared data file {path} is absent (set BAKALLM_SHARED_DATA to the folder that holds it)")
        return path

    return find


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: on a busy machine, waking a second thread costs more than the work itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
