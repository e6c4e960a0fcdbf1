"""The test command is one command, and the tiers it leaves out are real."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    test_section = readme.split("## Test", 1)[1]
    readme_command = re.search(r"```bash\n(.+?)\n```", test_section, re.DOTALL).group(1).strip()
    ci_commands = [
        line.strip()
        for line in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if "pytest" in line
    ]
    assert ci_commands == [readme_command]


def test_the_slow_tier_holds_tests():
    marked = [
        path.name
        for path in (REPO_ROOT / "tests").rglob("test_*.py")
        if "@pytest.mark.slow" in path.read_text(encoding="utf-8")
    ]
    assert marked, "README promises slow tests (python -m pytest -m slow); mark the long end-to-end tests slow"
