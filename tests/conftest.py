import pytest
import torch

from tpcompile.compat import torchvision_without_kernels

# timm's tests install PyPI's torchvision (a CUDA build) beside the CPU torch; transformers imports
# it too once pillow is there: let it import here and in every gloo rank (tests/multirank.py)
torchvision_without_kernels()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


import os
import sys

# the example models are what the parity tests train; spawned ranks inherit sys.path
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
