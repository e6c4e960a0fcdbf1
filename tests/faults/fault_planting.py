"""Plants one fault of the catalogue into bakallm by monkeypatching, then runs the tests that must catch it.

    python tests/faults/fault_planting.py FAULT_NAME [--every-test]

Without --every-test pytest stops at the first failure (-x), as the fault check does; with it,
every test of the fault runs, to see which of them catch it.

Exit status: 1 when a test failed (the fault was caught), 0 when every test passed (the fault
survived), PLANTING_FAILED when the fault could not be planted as written (a patched name or
argument no longer exists, or the patch itself raised), anything else: pytest could not run.

A patch replaces an object by name, "module:attribute" or "module:Class.attribute", everywhere it
is bound: in the module that names it and in every loaded bakallm module that imported the same
object, so code that did `from bakallm.x import f` sees the fault too. Patches are applied before
pytest imports the test modules, so the tests' own imports get the faulty objects as well.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLANTING_FAILED = 7
PACKAGE = "bakallm"


class PlantingError(RuntimeError):
    """The fault cannot be planted as the catalogue writes it: fix the catalogue, not the tests."""


@dataclass(frozen=True)
class Patch:
    """Wraps the callable at `target`: `arguments` maps parameter names to functions of the passed value,
    `result` is a function of (returned value, bound arguments) whose value is returned instead."""

    target: str
    arguments: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    result: Callable[[Any, dict[str, Any]], Any] | None = None


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]  # pytest ids, relative to the repository root; at least one must fail
    requires: tuple[str, ...] = ()  # importable modules the tests need; without them the fault is skipped


# How often each planted wrapper ran: a fault that is never exercised cannot be what failed a test.
calls: dict[str, int] = {}


def resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, current object) for "module:attribute" or "module:Class.attribute"."""
    module_name, _, path = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise PlantingError(
            f"{target}: module {module_name} cannot be imported ({error}); update the fault catalogue."
        ) from None
    *parents, name = path.split(".")
    for parent in parents:
        if not hasattr(owner, parent):
            raise PlantingError(
                f"{target}: {module_name} has no {parent}; the code was renamed, update the fault catalogue."
            )
        owner = getattr(owner, parent)
    if not hasattr(owner, name):
        raise PlantingError(f"{target}: {name} no longer exists; the code was renamed, update the fault catalogue.")
    return owner, name, getattr(owner, name)


def plant(patch: Patch) -> None:
    owner, name, original = resolve(patch.target)
    if not callable(original):
        raise PlantingError(f"{patch.target} is not callable, so it cannot be wrapped.")
    signature = inspect.signature(original)
    missing = sorted(set(patch.arguments) - set(signature.parameters))
    if missing:
        raise PlantingError(
            f"{patch.target} has no parameter {', '.join(missing)} any more; update the fault catalogue."
        )
    calls[patch.target] = 0

    @functools.wraps(original)
    def faulty(*args, **kwargs):
        calls[patch.target] += 1
        try:
            bound = signature.bind(*args, **kwargs)
            for argument, change in patch.arguments.items():
                if argument in bound.arguments:
                    bound.arguments[argument] = change(bound.arguments[argument])
        except Exception as error:
            raise PlantingError(f"planting {patch.target} failed: {error!r}") from error
        value = original(*bound.args, **bound.kwargs)
        if patch.result is None:
            return value
        try:
            return patch.result(value, bound.arguments)
        except Exception as error:
            raise PlantingError(f"planting {patch.target} failed: {error!r}") from error

    if inspect.isclass(owner):
        setattr(
            owner,
            name,
            staticmethod(faulty) if isinstance(inspect.getattr_static(owner, name), staticmethod) else faulty,
        )
        return
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").split(".")[0] == PACKAGE:
            for attribute, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attribute, faulty)


class FailureRecorder:
    """pytest plugin: which tests failed, and whether a failure came from the planting itself."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.planting_failed = False

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.failed.append(report.nodeid)
            self.planting_failed = self.planting_failed or "PlantingError" in report.longreprtext


def run(fault: Fault, every_test: bool = False) -> int:
    import pytest

    try:
        for patch in fault.patches:
            plant(patch)
    except PlantingError as error:
        print(f"FAULT {fault.name} NOT PLANTED: {error}")
        return PLANTING_FAILED
    recorder = FailureRecorder()
    options = ["-q", "-p", "no:cacheprovider", "--no-header"] + ([] if every_test else ["-x"])
    status = pytest.main([*options, *fault.tests], plugins=[recorder])
    if recorder.planting_failed:
        print(f"FAULT {fault.name} NOT PLANTED: its patch raised while the tests ran (see PlantingError above).")
        return PLANTING_FAILED
    if recorder.failed and not any(calls.values()):
        print(
            f"FAULT {fault.name} NOT PLANTED: {', '.join(recorder.failed)} failed but no patched code ran; the tests fail without the fault."
        )
        return PLANTING_FAILED
    if status == 1:
        print(f"FAULT {fault.name} CAUGHT BY {', '.join(recorder.failed)}")
    return int(status)


def main(argv: list[str]) -> int:
    from fault_catalogue import FAULTS

    by_name = {fault.name: fault for fault in FAULTS}
    names = [arg for arg in argv if arg != "--every-test"]
    if len(names) != 1 or names[0] not in by_name:
        print(f"usage: python {Path(__file__).name} FAULT_NAME [--every-test], FAULT_NAME one of: {', '.join(by_name)}")
        return 2
    return run(by_name[names[0]], every_test="--every-test" in argv)


if __name__ == "__main__":
    # One copy of this module: the catalogue imports it by name.
    import fault_planting

    sys.exit(fault_planting.main(sys.argv[1:]))
