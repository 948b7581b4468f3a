import os
import sys

# Tests run on CPU, deterministically, with DeepSpeed's CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, saying why, where no CUDA GPU is visible (CI)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_checklist.sh on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
