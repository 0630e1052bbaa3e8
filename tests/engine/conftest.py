import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic_inputs():
    """Every test draws the same inputs whatever ran before it in the process (xdist or not)."""
    torch.manual_seed(0)
