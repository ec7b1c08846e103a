"""Transformer Engine's kernels behind the CE ops (impl="te"): CUDA + transformer_engine only.

On a CPU machine only the error for selecting it runs (test_ce_kernels.py); these carry the
gpu marker, and skip where transformer_engine (the optional [te] extra) is not installed.
"""
import pytest
import torch
import torch.nn.functional as F


def _group():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD.group_name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction,eps", [("mean", 0.0), ("mean", 0.1), ("sum", 0.1), ("none", 0.0)])
def test_te_cross_entropy_matches_torch(dtype, reduction, eps):
    pytest.importorskip("transformer_engine")
    from tpcompile.runtime import vocab_parallel_cross_entropy

    name = _group()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (3 * torch.randn(256, 4096, generator=g, device="cuda")).to(dtype)
    t = torch.randint(0, 4096, (256,), generator=g, device="cuda")
    t[::5] = -100
    ref_x = x.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, reduction=reduction, label_smoothing=eps)
    up = torch.rand_like(ref) + 0.5
    ref.backward(up)
    for inplace in (False, True):
        xs = x.clone().requires_grad_()
        y = xs * 1  # a non-leaf, so inplace_backward applies
        loss = vocab_parallel_cross_entropy(y, t, 0, 4096, name, reduction=reduction, label_smoothing=eps,
                                            impl="te", inplace_backward=inplace)
        loss.backward(up.to(dtype))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
        torch.testing.assert_close(loss.float(), ref.detach(), **tol)
        torch.testing.assert_close(xs.grad.float(), ref_x.grad, **tol)


@pytest.mark.gpu
def test_te_rejects_padded_vocab():
    pytest.importorskip("transformer_engine")
    from tpcompile.runtime import vocab_parallel_cross_entropy

    x = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="impl 'te' needs equal vocab shards without padding"):
        vocab_parallel_cross_entropy(x, torch.zeros(4, dtype=torch.long, device="cuda"), 0, 9, _group(), impl="te")
