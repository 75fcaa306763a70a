"""vtprune: training-free visual token pruning for Hugging Face LLaVA-1.5 and LLaVA-NeXT.

    import vtprune
    pruner = vtprune.patch(model, "vtc-cls", keep=64)
    out = model.generate(**inputs, max_new_tokens=32)
    pruner.last.kept          # which patches reached the LLM
    pruner.unpatch()          # the model is exactly as before
"""

from .api import get_pruner, patch, pruned, unpatch
from .errors import UnsupportedModelError, UnsupportedSettingError, VTPruneError
from .registry import methods
from .report import Report, Stage

__version__ = "0.1.0"

__all__ = [
    "patch",
    "pruned",
    "unpatch",
    "get_pruner",
    "methods",
    "Report",
    "Stage",
    "VTPruneError",
    "UnsupportedModelError",
    "UnsupportedSettingError",
    "__version__",
]
