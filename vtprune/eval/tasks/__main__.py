"""`python -m vtprune.eval.tasks` prints the folder to pass to lmms-eval as --include_path."""

from . import TASKS_DIR

print(TASKS_DIR)
