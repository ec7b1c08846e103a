"""Train an example model with tensor parallelism from ``tpcompile.tp_compile``.

Three ways to run it:

    torchrun --nproc-per-node 2 examples/train.py [--model gpt|llama] [--steps 8] [--compare-single-device]
    python examples/train.py --launch 2 --compare-single-device      # starts torchrun itself (`make demo`)
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID \
        examples/train.py --tp 2 --optimizer adamw --lr 1e-3 --clip-grad-norm 1.0 --compare-single-device
                                      # on each of two nodes: dp=2 x tp=2, TP inside a node (docs/multinode.md)

Every rank builds the same single-device model (examples/gpt.py or examples/llama.py, seeded),
optionally keeps an untouched deep copy of it (``--compare-single-device``), then calls
``model = tpcompile.tp_compile(model)`` and trains both on the same batches. Rank 0 prints one
row per step (TP loss beside the single-device loss), the parameter elements each rank holds,
and a PASS/FAIL line; the exit code is 1 when the largest relative loss difference is above
``--tol``.

``--tp N`` (default: the world size) runs data parallel x tensor parallel: the world is a
``(dp, tp)`` DeviceMesh (``dp = world // N``, consecutive global ranks form a TP group, which torchrun
places on one node) and ``tp_compile(model, mesh=mesh, example_inputs=...)`` shards over ``"tp"`` and
applies FSDP2 over ``"dp"``. Every rank draws the same global batch and trains on its dp rank's slice;
the printed loss is the global one (the mean over dp ranks of the local losses), compared with the
single-device copy trained on the whole global batch. The script prints which global ranks form each
TP group and on which node (torchrun's ``GROUP_RANK``) each rank runs, and stops with an error when a
TP group spans nodes (``--allow-tp-across-nodes`` to run anyway).

``--tp-off`` skips ``tp_compile`` (the "tp" model is then the plain model, trained eagerly on
every rank, and must match the single-device copy exactly): a check of this script's plumbing.
Without torchrun and without ``--launch`` the script runs as a single rank (world size 1).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the example models sit next to this script; works from any CWD

# A few paragraphs of public-domain text (the Gettysburg Address, Bliss copy, 1863),
# encoded at byte level: vocabulary 256, no tokenizer needed.
TEXT = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, \
conceived in Liberty, and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so \
conceived and so dedicated, can long endure. We are met on a great battle-field of that war. \
We have come to dedicate a portion of that field, as a final resting place for those who here \
gave their lives that that nation might live. It is altogether fitting and proper that we \
should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- \
this ground. The brave men, living and dead, who struggled here, have consecrated it, far \
above our poor power to add or detract. The world will little note, nor long remember what we \
say here, but it can never forget what they did here. It is for us the living, rather, to be \
dedicated here to the unfinished work which they who fought here have thus far so nobly \
advanced. It is rather for us to be here dedicated to the great task remaining before us -- \
that from these honored dead we take increased devotion to that cause for which they gave the \
last full measure of devotion -- that we here highly resolve that these dead shall not have \
died in vain -- that this nation, under God, shall have a new birth of freedom -- and that \
government of the people, by the people, for the people, shall not perish from the earth.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["gpt", "llama"], default="gpt")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", choices=["text", "random"], default="text",
                   help="byte-level text bundled in this script, or a seeded random token stream")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default: 0.2 for sgd, 3e-3 for adamw")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compare-single-device", action="store_true",
                   help="every rank also trains an untouched copy of the single-device model")
    p.add_argument("--tol", type=float, default=1e-4, help="largest relative loss difference that passes")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor-parallel degree (default: the world size); dp = world // N, on a (dp, tp) mesh")
    p.add_argument("--backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
                   help="what compiles the rewritten graph (aot_eager: no Inductor, quick to start)")
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                   help="torch.nn.utils.clip_grad_norm_(model.parameters(), MAX) every step (both models)")
    p.add_argument("--allow-tp-across-nodes", action="store_true",
                   help="run even when a TP group spans torchrun nodes (its all-reduces then cross the network)")
    p.add_argument("--tp-off", action="store_true",
                   help="skip tp_compile: the 'tp' model is the plain model (checks this script)")
    p.add_argument("--torch-compile", action="store_true",
                   help="with --tp-off: run the plain model under torch.compile instead of eagerly")
    p.add_argument("--launch", type=int, default=0, metavar="N",
                   help="start torchrun with N processes on this script (the other flags are passed on)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# launcher: `python examples/train.py --launch N ...` == `torchrun --nproc-per-node N train.py ...`


def launch(nproc: int, argv: list[str]) -> int:
    if "RANK" in os.environ:
        raise SystemExit("--launch given inside a torchrun process; drop --launch or run with python")
    child_args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--launch":
            skip = True
        elif not a.startswith("--launch="):
            child_args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           os.path.abspath(__file__), *child_args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank (and no torchrun warning about it)
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


# --------------------------------------------------------------------------------------------
# the training run, one process per rank


def setup_distributed() -> tuple[int, int, torch.device]:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    if "RANK" in os.environ:  # under torchrun: env:// rendezvous
        dist.init_process_group(backend)
    else:  # plain `python train.py`: a world of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def make_dataset(kind: str, vocab_size: int, seed: int) -> torch.Tensor:
    if kind == "text":
        data = torch.tensor(list(TEXT.encode("utf-8")), dtype=torch.long)
        assert int(data.max()) < vocab_size
        return data
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (16384,), generator=g)


def get_batch(data: torch.Tensor, block: int, batch: int, g: torch.Generator, device: torch.device):
    """Random windows of the stream. The generator is seeded alike on every rank: same batch everywhere."""
    ix = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
    x = torch.stack([data[i : i + block] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix.tolist()])
    return x.to(device), y.to(device)


def build_model(name: str, seed: int, device: torch.device):
    if name == "gpt":
        from gpt import make_model

        model, _ = make_model(seed=seed, device=device)
        return model, model.config.block_size, model.config.vocab_size
    from llama import make_model

    model, _ = make_model(seed=seed, device=device)
    return model, model.config.max_seq_len, model.config.vocab_size


def make_optimizer(kind: str, params, lr: float | None) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.2 if lr is None else lr)
    return torch.optim.AdamW(params, lr=3e-3 if lr is None else lr, weight_decay=0.0)


def n_elements(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds (a DTensor parameter counts its local shard; tied weights once)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scalar(t) -> float:
    """A float from a (possibly DTensor) 0-d tensor: clip_grad_norm_ returns a DTensor for DTensor params."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def tp_groups_of(world: int, tp: int) -> list[list[int]]:
    """The global ranks of each TP group: the rows of ``init_device_mesh(device, (dp, tp))``."""
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)]


def check_placement(world: int, tp: int, say, allow_across: bool) -> bool:
    """Print where each rank runs and which ranks form each TP and DP group; False when a TP group
    spans nodes (and that is not allowed). A node is one torchrun agent: its workers share the
    ``GROUP_RANK`` (the node rank) and differ in ``LOCAL_RANK``."""
    me = (socket.gethostname(), int(os.environ.get("GROUP_RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    where: list = [None] * world
    dist.all_gather_object(where, me)
    say("placement (global rank: host, node = torchrun GROUP_RANK, LOCAL_RANK):")
    for r, (host, node, local) in enumerate(where):
        say(f"  rank {r}: host {host}, node {node}, local rank {local}")

    def nodes(ranks: list[int]) -> list[int]:
        return sorted({where[r][1] for r in ranks})

    ok = True
    groups = tp_groups_of(world, tp)
    for i, ranks in enumerate(groups):
        spans = nodes(ranks)
        hosts = sorted({where[r][0] for r in ranks})
        inside = len(spans) == 1 and len(hosts) == 1
        ok = ok and inside
        say(f"TP group {i}: global ranks {ranks} -> node(s) {spans}: "
            + ("inside one node" if inside else "SPANS NODES"))
    for j in range(tp):
        ranks = [g[j] for g in groups]
        if len(ranks) > 1:
            say(f"DP group {j}: global ranks {ranks} -> node(s) {nodes(ranks)}")
    if ok:
        say(f"TP groups inside nodes: yes ({len(groups)} group(s) of {tp})")
    elif allow_across:
        say("TP groups inside nodes: NO (--allow-tp-across-nodes: running anyway; TP all-reduces cross nodes)")
    else:
        say("TP groups inside nodes: NO. Each TP group must sit on one node: use --tp equal to (or dividing) "
            "--nproc-per-node, or pass --allow-tp-across-nodes.")
    return ok or allow_across


def train(args: argparse.Namespace) -> int:
    rank, world, device = setup_distributed()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    tp = world if args.tp is None else args.tp
    if tp < 1 or world % tp:
        raise SystemExit(f"--tp {tp} must divide the world size {world}")
    dp = world // tp
    if args.tp_off and dp > 1:
        raise SystemExit("--tp-off runs the plain model on every rank: it takes no --tp below the world size")
    if args.batch_size % dp:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) must divide by dp={dp}")
    per = args.batch_size // dp

    if not args.tp_off and not check_placement(world, tp, say, args.allow_tp_across_nodes):
        dist.barrier()
        dist.destroy_process_group()
        return 2

    random.seed(args.seed)
    torch.manual_seed(args.seed)

    model, block, vocab = build_model(args.model, args.seed, device)
    full_elements = n_elements(model)
    ref = copy.deepcopy(model) if args.compare_single_device else None  # before tp_compile

    data = make_dataset(args.data, vocab, args.seed)
    dp_rank, dp_group = 0, None
    if args.tp_off:
        mode = "OFF (--tp-off: plain model on every rank" + (", torch.compile)" if args.torch_compile else ", eager)")
        if args.torch_compile:
            model = torch.compile(model)
    else:
        import tpcompile

        if dp == 1:
            mode = f"tp_compile, tp={world}"
            model = tpcompile.tp_compile(model, backend=args.backend)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
            dp_rank, dp_group = mesh.get_local_rank("dp"), mesh["dp"].get_group()
            # a batch of the local shape: the plan must exist before FSDP2 shards the planned parameters
            example = get_batch(data, block, per, torch.Generator().manual_seed(args.seed + 1), device)
            mode = f"tp_compile(mesh=mesh), dp={dp} x tp={tp}: TP over mesh['tp'], FSDP2 over mesh['dp']"
            model = tpcompile.tp_compile(model, mesh=mesh, example_inputs=example, backend=args.backend)

    opt = make_optimizer(args.optimizer, model.parameters(), args.lr)
    ref_opt = make_optimizer(args.optimizer, ref.parameters(), args.lr) if ref is not None else None

    g = torch.Generator().manual_seed(args.seed)
    clip = args.clip_grad_norm

    say(f"model {args.model}: {full_elements:,} parameter elements | {world} rank(s), {dist.get_backend()} on "
        f"{device.type} | tensor parallel: {mode}")
    say(f"data: {args.data} ({len(data):,} tokens), global batch {args.batch_size} x {block}"
        + (f" ({per} per dp rank)" if dp > 1 else "")
        + f" | optimizer {args.optimizer}" + (f", clip_grad_norm_ {clip:g}" if clip is not None else "")
        + f" | {args.steps} steps")
    if not args.tp_off or args.torch_compile:
        say(f"step 1 compiles the model (Dynamo + {args.backend if not args.tp_off else 'inductor'}, forward and "
            "backward): expect tens of seconds on CPU")
    say("")
    loss_name = "tp loss" if dp == 1 else "global loss"
    head = f"{'step':>4} | {loss_name:>11} | {'single-device loss':>18} | {'rel diff':>9}"
    if clip is not None:
        head += f" | {'grad norm':>10} | {'single-dev norm':>15}"
    say(head + f" | {'step ms':>9}")
    say("-+-".join("-" * len(c) for c in (head + " | " + f"{'step ms':>9}").split(" | ")))

    losses, local_losses, ref_losses, rel_diffs, norm_diffs = [], [], [], [], []
    for step in range(1, args.steps + 1):
        x, y = get_batch(data, block, args.batch_size, g, device)  # the global batch, alike on every rank
        xl, yl = x[dp_rank * per:(dp_rank + 1) * per], y[dp_rank * per:(dp_rank + 1) * per]

        sync(device)
        t0 = time.perf_counter()
        loss = model(xl, yl)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        whole = loss.detach().clone()
        if dp_group is not None:  # global loss: the mean over dp ranks of each one's local loss
            dist.all_reduce(whole, group=dp_group)
            whole /= dp
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        local_losses.append(loss.item())
        losses.append(whole.item())

        ref_cell, diff_cell, norm_cells = "-", "-", ""
        if ref is not None:
            ref_loss = ref(x, y)
            ref_loss.backward()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) if clip is not None else None
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ref_losses.append(ref_loss.item())
            rel = abs(losses[-1] - ref_losses[-1]) / max(abs(ref_losses[-1]), 1e-12)
            rel_diffs.append(rel)
            ref_cell, diff_cell = f"{ref_losses[-1]:.6f}", f"{rel:.2e}"
            if clip is not None:
                a, b = scalar(norm), scalar(ref_norm)
                norm_diffs.append(abs(a - b) / max(abs(b), 1e-12))
                norm_cells = f" | {a:>10.6f} | {b:>15.6f}"
        elif clip is not None:
            norm_cells = f" | {scalar(norm):>10.6f} | {'-':>15}"
        note = "  (includes compile)" if step == 1 and (not args.tp_off or args.torch_compile) else ""
        say(f"{step:>4} | {losses[-1]:>11.6f} | {ref_cell:>18} | {diff_cell:>9}{norm_cells} | {ms:>9.1f}{note}")

    # what each rank holds now (after the first forward tp_compile has resharded in place)
    local = n_elements(model)
    all_local: list = [None] * world
    dist.all_gather_object(all_local, local)
    # every TP rank of a group computes the same (replicated) local loss
    all_losses: list = [None] * world
    dist.all_gather_object(all_losses, local_losses)
    spread = max(
        abs(a - b) / max(abs(b), 1e-12)
        for r in range(world) for a, b in zip(all_losses[r], all_losses[r - r % tp])
    )

    say("")
    per_rank = ", ".join(f"rank {r}: {n:,} ({100.0 * n / full_elements:.1f}%)" for r, n in enumerate(all_local))
    say(f"parameter elements: full model {full_elements:,} | local per rank: {per_rank}")
    say(f"loss agreement across the ranks of each TP group: max rel spread {spread:.2e}")

    ok = spread <= args.tol and all(math.isfinite(v) for v in losses)
    if ref is not None:
        worst = max(rel_diffs)
        worst_norm = max(norm_diffs) if norm_diffs else 0.0
        ok = ok and worst <= args.tol and worst_norm <= args.tol
        what = "global loss" if dp > 1 else "loss"
        say(f"{'PASS' if ok else 'FAIL'}: max relative {what} difference vs single device {worst:.2e} over "
            f"{args.steps} steps (tolerance {args.tol:.0e})"
            + (f"; grad norm {worst_norm:.2e}" if norm_diffs else "")
            + f"; rank spread {spread:.2e}")
    else:
        say(f"{'PASS' if ok else 'FAIL'}: ran {args.steps} steps, final loss {losses[-1]:.6f} "
            f"(no single-device comparison; add --compare-single-device)")

    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.launch:
        return launch(args.launch, argv)
    return train(args)


if __name__ == "__main__":
    rc = main()
    if "RANK" in os.environ:
        # A torchrun worker leaves without interpreter finalization: a gloo worker thread that
        # drops its last reference to a collective's tensor while Python is finalizing aborts
        # the process (SIGABRT, "terminate called without an active exception"; seen here in
        # about 1 run in 10 with torch 2.13 even after destroy_process_group, pytorch#190489).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
