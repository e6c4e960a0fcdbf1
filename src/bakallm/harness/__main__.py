"""`python -m bakallm.harness ARGS`: `lm_eval ARGS` with the `bakallm` model and bakallm's tasks available."""

import sys

from lm_eval.__main__ import cli_evaluate

import bakallm.harness.lm  # noqa: F401 (registers the `bakallm` model)
from bakallm.harness import TASKS_DIR

if __name__ == "__main__":
    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()
