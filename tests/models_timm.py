"""timm (PyTorch Image Models) for tests/test_models.py: ViTs from timm's own factory, random weights.

``VisionTransformer``'s attention is one fused ``qkv`` projection, reshaped pieces-first to
``(B, N, 3, heads, head_dim)``, permuted and taken apart with ``unbind(0)``: column-parallel in
3 pieces, heads sharded, ``proj`` row-parallel; the MLP's ``fc1`` / ``fc2`` column / row. The patch
embedding (a conv) and the 10-class head stay replicated. The user's loop:
``F.cross_entropy(model(images), labels)``, SGD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models_common import assert_at_floor, assert_parity, train_beside
from tpcompile.compat import torchvision_without_kernels

CLASSES = 10
DEPTH = {"vit": 2, "vit_qk_norm_written_out": 1}  # blocks per case


def _vit(depth: int, **kw) -> torch.nn.Module:
    torchvision_without_kernels()  # PyPI's torchvision is a CUDA build; this torch is the CPU one
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             embed_dim=64, num_heads=4, num_classes=CLASSES, **kw)


def _classify(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def _batches(n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (4,), generator=g)) for _ in range(n)]


def vit(rank: int, world: int) -> dict:
    """timm's default ViT: SDPA attention, class token."""
    return train_beside(rank, world, _vit(DEPTH["vit"]), _batches(), _classify)


def vit_qk_norm_written_out(rank: int, world: int) -> dict:
    """``qk_norm=True`` (a LayerNorm over head_dim of q and k), attention written out
    (``q @ k.transpose``, softmax, ``@ v``: timm's non-fused path), average pooling, no class token."""
    model = _vit(DEPTH["vit_qk_norm_written_out"], qk_norm=True, global_pool="avg", class_token=False)
    for block in model.blocks:
        block.attn.fused_attn = False
    return train_beside(rank, world, model, _batches(), _classify)


CASES = {"vit": (vit, ()), "vit_qk_norm_written_out": (vit_qk_norm_written_out, ())}


def check(name: str, world: int, results: list) -> None:
    r, depth = assert_parity(results), DEPTH[name]
    assert r["n_graphs"] == 1
    assert r["floor"] == [{"forward": 2 * depth, "backward": 2 * depth}]  # Megatron's: 2 each way per block
    if name == "vit_qk_norm_written_out":
        # q_norm / k_norm weight and bias are whole on every rank but each rank's backward sees only its
        # heads: their gradients need one all-reduce each (head_dim floats; the floor does not count
        # these, and one bucketed all-reduce could carry all of them)
        assert [c for c in r["collectives"] if c[1] == "forward"] == [(0, "forward", "all_reduce")] * 2 * depth
        assert [c for c in r["collectives"] if c[1] == "backward"] == [(0, "backward", "all_reduce")] * 6 * depth
    else:
        assert_at_floor(r)
    megatron = {"attn.qkv.weight": ("colwise", 0, 3), "attn.qkv.bias": ("colwise", 0, 3),
                "attn.proj.weight": ("rowwise", 1, 1), "mlp.fc1.weight": ("colwise", 0, 1),
                "mlp.fc1.bias": ("colwise", 0, 1), "mlp.fc2.weight": ("rowwise", 1, 1)}
    want = {f"blocks.{b}.{p}": s for b in range(depth) for p, s in megatron.items()}
    assert {f: s for f, s in r["plan"].items() if s[0] != "replicate"} == want
    if name == "vit_qk_norm_written_out":
        assert r["plan"]["blocks.0.attn.q_norm.weight"][0] == "replicate"  # over head_dim: whole on every rank
    # only the patch embedding (conv2d, no rule) is reported; the 3 pieces are no longer an error
    assert len(r["warnings"]) == 1 and "`conv2d` with parameter patch_embed.proj.weight" in r["warnings"][0]
    sharded = sum(4 * 64 * 64 + 2 * 64 * 256 + 3 * 64 + 256 for _ in range(depth))  # qkv, proj, fc1, fc2 (+bias)
    assert r["local_numel"] == r["full_numel"] - sharded + sharded // world
