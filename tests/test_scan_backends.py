"""Choosing the selective scan's backend: "auto" by device, forced backends that cannot run refused."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.acceleration import use_scan_backend
from bakallm.errors import UserError
from bakallm.kernels import scan


@pytest.fixture
def triton_missing(monkeypatch):
    monkeypatch.setattr(scan, "_triton", {"module": "No module named 'triton'"})


def test_auto_picks_the_compiled_scan_on_cpu_and_falls_back_to_the_blocked_one_with_one_warning(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(scan, "_self_checks", {("cpu", cpu): None})  # as if it had built and passed
    assert scan.resolve_scan_backend("auto", cpu) == "cpu"
    monkeypatch.setattr(scan, "_self_checks", {("cpu", cpu): "it could not be built here (OSError: no compiler)"})
    monkeypatch.setattr(scan, "_warned", set())
    with pytest.warns(
        UserWarning,
        match=r"The compiled CPU scan is not used: it could not be built here \(OSError: no compiler\); the blocked scan runs instead\.",
    ):
        assert scan.resolve_scan_backend("auto", cpu) == "blocked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: every Mamba block resolves its backend at every call
        assert scan.resolve_scan_backend("auto", cpu) == "blocked"


def test_a_cpu_scan_that_cannot_be_built_says_why(monkeypatch):
    monkeypatch.setattr(scan, "_self_checks", {})
    monkeypatch.setattr(scan, "compiled_module", lambda: "CalledProcessError: Command 'c++' returned 1")
    assert scan.self_check_failure("cpu", torch.device("cpu")) == (
        "it could not be built here (CalledProcessError: Command 'c++' returned 1)"
    )
    with pytest.raises(
        UserError,
        match=r"The cpu scan backend cannot run: it could not be built here .*; choose --scan blocked or auto\.$",
    ):
        scan.resolve_scan_backend("cpu", torch.device("cpu"))


def test_forced_cpu_scan_off_the_cpu_is_refused():
    with pytest.raises(UserError, match="The cpu scan backend runs on the CPU, not on meta; choose --scan auto."):
        scan.resolve_scan_backend("cpu", torch.device("meta"))


def test_auto_picks_triton_on_cuda_only_when_triton_imports(monkeypatch, triton_missing):
    assert scan.resolve_scan_backend("auto", torch.device("cuda")) == "parallel"
    monkeypatch.setattr(scan, "_triton", {"module": object()})
    monkeypatch.setattr(scan, "_self_checks", {("triton", torch.device("cuda")): None})  # as if it had passed there
    assert scan.resolve_scan_backend("auto", torch.device("cuda")) == "triton"


def test_auto_falls_back_to_the_log_depth_scan_with_a_warning_when_the_self_check_fails(monkeypatch):
    monkeypatch.setattr(scan, "_triton", {"module": object()})
    monkeypatch.setattr(scan, "_self_checks", {("triton", torch.device("cuda")): "CompilationError: at 12:4"})
    monkeypatch.setattr(scan, "_warned", set())
    with pytest.warns(
        UserWarning,
        match=r"The Triton scan failed its self-check on cuda \(CompilationError: at 12:4\); the log-depth \(parallel\) scan runs instead\.",
    ):
        assert scan.resolve_scan_backend("auto", torch.device("cuda")) == "parallel"


def test_self_check_reports_a_kernel_that_does_not_run_or_gives_wrong_results(monkeypatch):
    class Broken:
        @staticmethod
        def selective_scan_triton(*inputs):
            raise RuntimeError("PTX compilation failed\nmore lines")

    class Wrong:
        @staticmethod
        def selective_scan_triton(x, dt, A, B, C, D, h0):
            y, h = scan.selective_scan_reference(x, dt, A, B, C, D, h0)
            return y * 1.01, h

    monkeypatch.setattr(scan, "_triton", {"module": Broken()})
    assert scan._self_check("triton", torch.device("cpu")) == "RuntimeError: PTX compilation failed"
    monkeypatch.setattr(scan, "_triton", {"module": Wrong()})
    assert (
        scan._self_check("triton", torch.device("cpu"))
        == "its results differ from the reference scan's by 1.0e-02 (relative)"
    )
    monkeypatch.setattr(scan, "_triton", {"module": scan})  # the reference itself under the Triton name
    monkeypatch.setattr(scan, "selective_scan_triton", scan.selective_scan_reference, raising=False)
    with torch.inference_mode():  # evaluation calls the scan there; the check still takes gradients
        assert scan._self_check("triton", torch.device("cpu")) is None


def test_forced_backends_are_kept():
    for backend in ("blocked", "parallel", "reference"):
        assert scan.resolve_scan_backend(backend, torch.device("cpu")) == backend


def test_forced_triton_without_triton_says_how_to_get_it(triton_missing):
    with pytest.raises(UserError, match=r"pip install triton, or choose --scan blocked\.$"):
        scan.resolve_scan_backend("triton", torch.device("cuda"))


def test_forced_triton_off_cuda_is_refused():
    with pytest.raises(UserError, match="runs on CUDA devices"):
        scan.resolve_scan_backend("triton", torch.device("meta"))


def test_unknown_backend_is_refused():
    with pytest.raises(
        UserError, match="Unknown scan backend 'fast'; choose one of auto, triton, cpu, parallel, blocked, reference"
    ):
        scan.resolve_scan_backend("fast", torch.device("cpu"))


def test_use_scan_backend_sets_every_mamba_block_and_checks_the_device(triton_missing):
    model = BakaLM(
        ModelConfig.preset(
            "tiny", vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, window=16, n_memory=2, n_pauses=1
        )
    )
    use_scan_backend(model, "reference")
    assert [layer.mamba.scan for layer in model.layers] == ["reference", "reference"]
    with pytest.raises(UserError, match="needs the triton package"):
        use_scan_backend(model, "triton")
    assert [layer.mamba.scan for layer in model.layers] == ["reference", "reference"]


def test_building_the_cpu_kernels_is_announced_only_when_it_is_not_cached(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp_extension

    from bakallm.kernels import cpu_build

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **options: f"module {options['name']}")
    monkeypatch.setattr(cpu_build, "_built", {})
    assert cpu_build.compiled_module().startswith("module bakallm_cpu_kernels_")
    assert capsys.readouterr().err == "bakallm: building the CPU kernels for this machine (once, about 40 s)\n"
    (tmp_path / f"{cpu_build.compiled_module().split()[1]}.so").write_bytes(b"")
    monkeypatch.setattr(cpu_build, "_built", {})
    cpu_build.compiled_module()
    assert capsys.readouterr().err == ""


def build_directory(root, name):
    """What torch.utils.cpp_extension gives each extension: a folder of its own, made if missing."""
    (root / name).mkdir(exist_ok=True)
    return str(root / name)


def test_without_openmp_the_kernel_is_built_to_run_on_one_thread(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp_extension

    from bakallm.kernels import cpu_build

    def no_openmp(**options):
        if "-fopenmp" in options["extra_cflags"]:
            raise RuntimeError("Error building extension: ld: cannot find -lgomp")
        return SimpleNamespace(flags=options["extra_cflags"])

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: build_directory(tmp_path, name))
    monkeypatch.setattr(cpp_extension, "load", no_openmp)
    monkeypatch.setattr(cpu_build, "_built", {})
    assert cpu_build.compiled_module().flags == ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"]
    assert capsys.readouterr().err.count("building the CPU kernels") == 1
    assert cpu_build.openmp_failure() == "RuntimeError: Error building extension: ld: cannot find -lgomp"


def test_a_failed_build_is_not_tried_again_in_the_next_process(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    from bakallm.kernels import cpu_build

    tried = []

    def no_openmp(**options):
        tried.append(options["extra_cflags"][-1])
        if "-fopenmp" in options["extra_cflags"]:
            raise RuntimeError("Error building extension: ld: cannot find -lgomp")
        return SimpleNamespace()

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: build_directory(tmp_path, name))
    monkeypatch.setattr(cpp_extension, "load", no_openmp)
    for _process in range(2):
        monkeypatch.setattr(cpu_build, "_built", {})
        cpu_build.compiled_module()
    assert tried == ["-fopenmp", "-fopenmp-simd", "-fopenmp-simd"]
    assert cpu_build.openmp_failure().startswith(
        "RuntimeError: Error building extension: ld: cannot find -lgomp (when last tried; delete "
    )


def test_a_cpu_scan_on_one_thread_is_said_once_when_pytorch_has_more(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(scan, "_self_checks", {("cpu", cpu): None})
    monkeypatch.setattr(scan, "openmp_failure", lambda: "RuntimeError: ld: cannot find -lgomp")
    monkeypatch.setattr(scan, "_warned", set())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match=r"runs on one thread: it could not be built with OpenMP here \(Runtime"):
            assert scan.resolve_scan_backend("auto", cpu) == "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert scan.resolve_scan_backend("cpu", cpu) == "cpu"
        torch.set_num_threads(1)
        monkeypatch.setattr(scan, "_warned", set())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one thread asked for: nothing is lost
            assert scan.resolve_scan_backend("auto", cpu) == "cpu"
    finally:
        torch.set_num_threads(threads)


def test_a_failed_build_is_reported_in_one_line(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    from bakallm.kernels import cpu_build

    def no_compiler(**options):
        raise RuntimeError("Error building extension 'bakallm_cpu_scan': c++: not found\nmore output")

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: "/nonexistent")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_build, "_built", {})
    assert cpu_build.compiled_module() == "RuntimeError: Error building extension 'bakallm_cpu_scan': c++: not found"
