import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set BAKALLM_SHARED_DATA to run this test)")
    return path


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
