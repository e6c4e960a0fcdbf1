"""`python -m bakallm.harness ARGS`: `lm_eval ARGS` with the `bakallm` model and bakallm's tasks available.

Our own errors (a wrong model or data path) end the run with one sentence and exit status 2, as
every `bakallm` command does; the harness's own errors are left as the harness reports them.
"""

import sys

from lm_eval.__main__ import cli_evaluate

import bakallm.harness.lm  # noqa: F401 (registers the `bakallm` model)
from bakallm.errors import UserError
from bakallm.harness import TASKS_DIR


def main() -> int:
    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    try:
        cli_evaluate()
    except UserError as error:
        print(f"bakallm.harness: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
