import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"


def golden_dir(method: str) -> Path:
    path = GOLDEN / method
    if not path.is_dir():
        message = f"golden cases not found at {path} (expected ../shared/golden beside the repository)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def llava():
    from vtprune.testing import tiny_llava

    return tiny_llava()


@pytest.fixture(scope="session")
def llava_next():
    from vtprune.testing import tiny_llava_next

    return tiny_llava_next("small")


@pytest.fixture(scope="session")
def llava_next_full():
    from vtprune.testing import tiny_llava_next

    return tiny_llava_next()
