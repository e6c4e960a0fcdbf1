"""Plants each fault of fault_catalogue.py in a fresh Python process and checks that its tests catch it.

A fault that survives means a feature can break without the suite noticing; a fault that cannot
be planted means the code it patches was renamed, and the catalogue must follow (see docs/testing.md).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from fault_catalogue import FAULTS
from fault_planting import PLANTING_FAILED, Patch, PlantingError, plant

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def test_fault_names_are_unique_and_every_fault_names_existing_tests():
    assert len({fault.name for fault in FAULTS}) == len(FAULTS)
    for fault in FAULTS:
        assert fault.patches and fault.tests, fault.name
        for test in fault.tests:
            path, _, name = test.partition("::")
            name = name.partition("[")[0]  # a parametrized test's id names its function before the brackets
            assert f"def {name}(" in (REPO_ROOT / path).read_text(encoding="utf-8"), (
                f"{fault.name}: {test} does not exist"
            )


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_planted_fault_is_caught(fault):
    missing = [module for module in fault.requires if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"the tests that catch {fault.name} need {', '.join(missing)}")
    result = subprocess.run(
        [sys.executable, str(HERE / "fault_planting.py"), fault.name],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode != PLANTING_FAILED, f"fault {fault.name} could not be planted:\n{output}"
    assert result.returncode != 0, (
        f"fault {fault.name} ({fault.description}) survived: {', '.join(fault.tests)} all passed."
    )
    assert result.returncode == 1, (
        f"the tests of fault {fault.name} could not run (pytest exit status {result.returncode}):\n{output}"
    )


@pytest.mark.parametrize(
    "patch, message",
    [
        (Patch("bakallm.model.attention:XLAttention.forward_renamed"), "forward_renamed no longer exists"),
        (Patch("bakallm.no_such_module:function"), "cannot be imported"),
        (Patch("bakallm.model.attention:NoSuchClass.forward"), "has no NoSuchClass"),
        (
            Patch("bakallm.model.attention:xl_attention_mask", arguments={"renamed_argument": abs}),
            "no parameter renamed_argument",
        ),
    ],
)
def test_a_renamed_target_fails_loudly_instead_of_planting_nothing(patch, message):
    with pytest.raises(PlantingError, match=message):
        plant(patch)
