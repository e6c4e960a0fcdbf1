import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

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
        scan_slices_at_once()


def scan_slices_at_once() -> None:
    """Triton's interpreter runs a scan with a custom combine function (the selective scan's)
    element by element in Python, ~0.25 ms each: a tiny model's training step took a minute. This
    runs the same combine function one step along the scanned axis at a time, on whole slices; the
    interpreter still flips the input around it for a reverse scan. tests/test_interpreter_scan.py
    checks it against the interpreter's own version."""
    try:
        import numpy as np
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        return
    if hasattr(ScanOps, "element_by_element_scan"):
        return

    def generic_scan(self, inputs):
        data = [tensor.handle.data for tensor in inputs]
        outputs = [np.empty_like(array) for array in data]
        carried = None
        for step in range(data[0].shape[self.axis]):
            here = (slice(None),) * self.axis + (step,)
            current = tuple(
                self.to_tensor(np.ascontiguousarray(array[here]), tensor.dtype) for array, tensor in zip(data, inputs)
            )
            carried = current if carried is None else self.combine_fn.fn(*carried, *current)
            carried = carried if isinstance(carried, tuple) else (carried,)
            for output, value in zip(outputs, carried):
                output[here] = value.handle.data
        return [self.to_tensor(output, tensor.dtype) for output, tensor in zip(outputs, inputs)]

    ScanOps.element_by_element_scan = ScanOps.generic_scan
    ScanOps.generic_scan = generic_scan


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module, for tests of a script that is not part of the package; the
    scripts import their neighbour `common`, so the folder is on sys.path while it loads."""
    folder = REPO_ROOT / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


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


# A one-layer tiny model: small enough that a training step takes milliseconds.
SMALL_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "window": 32, "n_memory": 2, "n_pauses": 2}


@pytest.fixture(scope="session")
def small_train_args() -> Callable[..., list[str]]:
    """`small_train_args(folder, corpus, *extra)`: the `bakallm train` arguments of SMALL_MODEL on
    `corpus` in bytes (2 rows x 64 tokens, one thread, no progress bar), its model config and token
    cache kept in `folder`, with `extra` after them."""
    import json

    def build(folder: Path, corpus: Path, *extra: str) -> list[str]:
        model_file = folder / "small.json"
        model_file.write_text(json.dumps(SMALL_MODEL))
        return [
            "train", "--preset", "tiny", "--model-config", str(model_file), "--data", str(corpus), "--tokenizer", "bytes",
            "--batch-size", "2", "--train-ctx", "64", "--warmup-steps", "1", "--no-progress", "--threads", "1",
            "--cache-dir", str(folder / "cache"), *extra,
        ]  # fmt: skip

    return build


@pytest.fixture(params=["compiled", "pytorch"])
def cpu_kernels(request, monkeypatch) -> SimpleNamespace:
    """Runs a test through the compiled CPU passes (kernels/cpu_fused.py), and again through the
    PyTorch operations they replace. `.calls` counts the model's requests for the compiled kernels,
    given on the first run and refused on the second, so a test can check the kernels were asked for."""
    from bakallm.kernels import cpu_fused

    built = "turned off by the test"
    if request.param == "compiled":
        built = cpu_fused.compiled_module()
        if isinstance(built, str):
            pytest.skip(f"the CPU kernels do not build here: {built}")
    state = SimpleNamespace(compiled=request.param == "compiled", calls=0)

    def counted():
        state.calls += 1
        return built

    monkeypatch.setattr(cpu_fused, "compiled_module", counted)
    return state
