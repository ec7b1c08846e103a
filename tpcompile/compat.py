"""Model libraries as tpcompile meets them: importing them on a CPU-only machine, and Hugging Face's
lazily installed output hooks.

PyPI's ``torchvision`` wheel is a CUDA build. Under a CPU ``torch`` its compiled ops fail to load,
which torchvision tolerates, but its fake-tensor registrations for ``torchvision::nms`` / ``qnms``
then stop ``import torchvision`` (``operator torchvision::nms does not exist``), and with it
``import timm``, which needs torchvision only for image transforms and ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

import torch

_LIBRARIES: list = []  # keeps the schema-only torchvision library alive


def torchvision_without_kernels() -> bool:
    """Let a torchvision whose compiled ops cannot load import anyway; call before ``import timm``.

    Where its ops do not load, defines the schemas of ``torchvision::nms`` and ``qnms`` (no kernels:
    calling them raises, loudly) so that the import goes through; the models (timm's ViT, ResNet, ...)
    do not use them. Does nothing where torchvision is absent, already imported, or its ops load (a
    CPU build, or a CUDA build beside a CUDA torch). Returns True if it defined the schemas.
    """
    if "torchvision" in sys.modules or _has_nms():
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    finder = importlib.machinery.FileFinder(
        spec.submodule_search_locations[0],
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    ext = finder.find_spec("_C")
    try:
        if ext is None:
            raise OSError("no torchvision._C")
        torch.ops.load_library(ext.origin)  # what torchvision's own import does first
        return False
    except OSError:  # a CUDA build under a CPU torch (or the other way round)
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARIES.append(lib)
        return True


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        return False
    return True


def install_output_hooks(model: torch.nn.Module) -> None:
    """Install Hugging Face's output-capturing hooks (``output_hidden_states``, ``output_router_logits``,
    ``output_attentions``) on ``model`` now, as its first call asking for them would.

    HF installs them lazily, inside the forward. Traced by Dynamo with ``nested_graph_breaks`` (which
    tpcompile's twin needs) that install fails (``cannot create weak reference to 'dict' object``:
    torch 2.13 rebuilds the module's hook ``OrderedDict`` as a dict); and hooks put only on the twin would
    not be the user's. Installed on the user's model before the twin is copied, both hold the same
    hooks, which Dynamo traces inline (they do nothing unless an output is asked for).
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and _CAN_RECORD_REGISTRY.get(m):
            maybe_install_capturing_hooks(m)
