"""lm-evaluation-harness support: the `bakallm` model (lm.py) and offline tasks (tasks/).

`python -m bakallm.harness ...` is the harness's own `lm_eval` command with the `bakallm` model
registered and bakallm's tasks on the include path (see docs/generation.md).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")
