"""Worker for tests/test_distributed.py: one torchrun process (gloo, CPU) per rank.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 _dist_worker.py OUT``.
Every scenario runs on every rank; a failure in one is recorded and the next still runs. Rank 0
writes ``{scenario: {"ok": bool, ...measurements}}`` as JSON to ``OUT``, with
``"deepsup_files"``: the ``deepsup.__file__`` of each rank (the tests check it is the tree under
test, not an installed copy).

Each scenario trains the same tiny segmentation net from the same initial weights on different
data per rank and compares against a local reference: one process that computes every rank's
gradient itself and averages them (what data-parallel training must be equal to).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

STEPS = 3
LR = 0.1
CLASSES = 4


class Net(nn.Module):
    """A tiny dense-prediction net with stages to tap and shard."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.cls = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.cls(self.layer2(self.layer1(self.stem(x))))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def make_sup(weight: Any = 0.4) -> Any:
    from deepsup import DeepSupervision, heads

    torch.manual_seed(0)  # the same initial weights on every rank
    return DeepSupervision(
        Net(),
        {"layer1": weight},
        head=heads.seg(num_classes=CLASSES, dropout=0.0),
        criterion=nn.CrossEntropyLoss(),
    )


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on each rank, reproducible by any process."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(
        0, CLASSES, (4, 16, 16), generator=g
    )


def total_loss(sup: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    output, aux = sup(x, target=y)
    return F.cross_entropy(output, y) + sum(aux.values())


def reference(weight: Any, world: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Single-process data parallelism: the mean of every rank's gradient, then SGD."""
    return data_parallel(
        lambda: make_sup(weight), lambda sup, step, rank: total_loss(sup, *batch(step, rank)),
        world, steps,
    )  # fmt: skip


def data_parallel(
    build: Callable[[], Any], loss_at: Callable[[Any, int, int], torch.Tensor], world: int,
    steps: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """What ``world`` ranks of data parallelism must compute: SGD on the mean of every rank's
    gradient, in one process; ``loss_at(sup, step, rank)`` is a rank's loss at a step."""
    sup = build()
    sup.train()
    opt = torch.optim.SGD(sup.parameters(), lr=LR)
    params = dict(sup.named_parameters())
    for step in range(steps):
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for rank in range(world):
            opt.zero_grad()
            loss_at(sup, step, rank).backward()
            for n, p in params.items():
                if p.grad is not None:
                    grads[n] += p.grad / world
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        sup.step()
    return {n: p.detach().clone() for n, p in params.items()}


def strip(name: str) -> str:
    return name.removeprefix("module.")


def gather_max_diff(params: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Largest difference of each parameter between this rank and every other rank."""
    out: dict[str, float] = {}
    for name, p in params:
        t = p.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        out[strip(name)] = max(float((q - parts[0]).abs().max()) for q in parts)
    return out


def max_diff_to(ref: dict[str, torch.Tensor], params: Iterator[tuple[str, torch.Tensor]]) -> float:
    return max(float((p.detach() - ref[strip(n)]).abs().max()) for n, p in params)


# scenarios ----------------------------------------------------------------------------------


def ddp_wrapper() -> dict[str, Any]:
    """DDP(sup): model and heads stay identical across ranks and equal the reference."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sup = make_sup()
    init = {n: p.detach().clone() for n, p in sup.named_parameters()}
    ddp = DistributedDataParallel(sup)
    sup.train()
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        total_loss(ddp, *batch(step, rank)).backward()
        opt.step()
    across = gather_max_diff(sup.named_parameters())
    moved = {n: float((p.detach() - init[n]).abs().max()) for n, p in sup.named_parameters()}
    return {
        "ok": True,
        "max_diff_across_ranks": max(across.values()),
        "max_diff_to_reference": max_diff_to(reference(0.4, world), sup.named_parameters()),
        "head_params": sum(1 for n in across if n.startswith("heads.")),
        "min_head_change": min(v for n, v in moved.items() if n.startswith("heads.")),
    }


def ddp_cutoff() -> dict[str, Any]:
    """A weight that drops to 0 (Cutoff) trains on under DDP without find_unused_parameters."""
    from deepsup import schedules

    world, rank = dist.get_world_size(), dist.get_rank()
    weight = schedules.Cutoff(0.4, at=1)
    sup = make_sup(weight)
    ddp = DistributedDataParallel(sup)  # find_unused_parameters=False, the default
    sup.train()
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    weights, head_grad_norms = [], []
    for step in range(STEPS + 1):
        opt.zero_grad()
        weights.append(sup.weights["layer1"])
        total_loss(ddp, *batch(step, rank)).backward()
        head_grad_norms.append(
            float(sum(p.grad.abs().sum() for p in sup.heads["layer1"].parameters()))
        )
        opt.step()
        sup.step()
    across = gather_max_diff(sup.named_parameters())
    return {
        "ok": True,
        "weights": weights,
        "head_grad_norms": head_grad_norms,
        "max_diff_across_ranks": max(across.values()),
        "max_diff_to_reference": max_diff_to(
            reference(weight, world, STEPS + 1), sup.named_parameters()
        ),
    }


def fsdp2() -> dict[str, Any]:
    """FSDP2 (fully_shard) on CPU/gloo: blocks and the wrapper sharded, compared with reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from deepsup import schedules

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    weight = schedules.Cutoff(0.4, at=2)  # the head's loss is multiplied by 0 from step 2
    sup = make_sup(weight)
    for block in (sup.model.stem, sup.model.layer1, sup.model.layer2):
        fully_shard(block, mesh=mesh)
    fully_shard(sup, mesh=mesh)
    sharded = sum(isinstance(p, DTensor) for p in sup.parameters())
    sup.train()
    opt = torch.optim.SGD(sup.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = total_loss(sup, *batch(step, rank))
        loss.backward()
        opt.step()
        sup.step()
        losses.append(float(loss.detach()))
    full = [
        (n, p.full_tensor() if isinstance(p, DTensor) else p) for n, p in sup.named_parameters()
    ]
    # the same data on every step, to see the loss fall
    repeat = []
    for _ in range(4):
        opt.zero_grad()
        loss = total_loss(sup, *batch(0, rank))
        loss.backward()
        opt.step()
        repeat.append(float(loss.detach()))
    return {
        "ok": True,
        "sharded_params": sharded,
        "params": sum(1 for _ in sup.parameters()),
        "losses": losses,
        "repeat_losses": repeat,
        "max_diff_to_reference": max_diff_to(reference(weight, world), iter(full)),
    }


def make_lm_sup() -> Any:
    """A tiny HF Llama with LayerSkip's rotational curriculum over its first three layers,
    every exit through the model's own norm and lm_head (``heads.reuse``)."""
    import transformers

    from deepsup import DeepSupervision, heads, losses, schedules

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    taps = [f"model.layers.{i}" for i in range(3)]
    return DeepSupervision(
        model,
        schedules.rotational(taps, schedules.depth_weights(taps, "l")),
        head=heads.reuse(model.model.norm, model.lm_head),
        criterion=losses.NextToken(),
    )


def lm_loss(sup: Any, step: int, rank: int) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))
    out, aux = sup(input_ids=ids, labels=ids, target=ids)
    return out.loss + sum(aux.values())


def ddp_llm_rotational() -> dict[str, Any]:
    """DDP around a causal LM whose exits rotate: the exits that are off run no head (the
    shared lm_head is not called for them), and DDP needs no find_unused_parameters."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sup = make_lm_sup()
    head = sup.model.lm_head.weight.detach().clone()
    ddp = DistributedDataParallel(sup)  # find_unused_parameters=False, the default
    sup.train()
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    active = []
    for step in range(STEPS):
        opt.zero_grad()
        active.append([t for t, w in sup.weights.items() if w > 0])
        lm_loss(ddp, step, rank).backward()
        opt.step()
        sup.step()
    across = gather_max_diff(sup.named_parameters())
    ref = data_parallel(make_lm_sup, lm_loss, world, STEPS)
    return {
        "ok": True,
        "active": active,
        "params": sum(1 for _ in sup.parameters()),
        "model_params": sum(1 for _ in sup.model.parameters()),
        "lm_head_change": float((sup.model.lm_head.weight.detach() - head).abs().max()),
        "max_diff_across_ranks": max(across.values()),
        "max_diff_to_reference": max_diff_to(ref, sup.named_parameters()),
    }


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "ddp_llm_rotational": ddp_llm_rotational,
    "ddp_wrapper": ddp_wrapper,
    "ddp_cutoff": ddp_cutoff,
    "fsdp2": fsdp2,
}


def main(argv: list[str]) -> int:
    out_path = argv[1]
    only = argv[2].split(",") if len(argv) > 2 else list(SCENARIOS)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    import deepsup

    results: dict[str, Any] = {}
    try:
        files: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(files, deepsup.__file__)  # which deepsup each rank imported
        results["deepsup_files"] = files
        for name in only:
            try:
                results[name] = SCENARIOS[name]()
            except Exception as err:
                results[name] = {
                    "ok": False,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
            dist.barrier()
        if dist.get_rank() == 0:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
