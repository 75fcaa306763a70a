"""Task definitions shipped with vtprune for lmms-eval.

`TASKS_DIR` is the folder to pass as `--include_path`; `python -m vtprune.eval.tasks` prints it:

    python -m lmms_eval --model vtprune --include_path "$(python -m vtprune.eval.tasks)" --tasks vtprune_shapes ...

`LOCAL_DATASETS.md` here explains how to run the standard tasks (mme, pope, gqa, textvqa, ...) from
local copies of their datasets.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
OFFLINE_TASKS = ("vtprune_scenes", "vtprune_scenes_next", "vtprune_shapes", "vtprune_shapes_mc")

__all__ = ["TASKS_DIR", "OFFLINE_TASKS"]
