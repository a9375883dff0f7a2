"""GPU check: deepsup's CUDA behaviour and train-step cost, in one run, as a markdown report.

On the first CUDA device, with torchvision's ``deeplabv3_resnet50`` (random weights):

1. **Eval passthrough**: the eval wrapper's output equals the bare model's bit for bit, with
   and without ``target=``, and no head runs.
2. **Train step** in fp32, bf16 autocast and fp16 autocast with ``GradScaler``: one SGD step of
   the wrapper (aux-free model, head on ``backbone.layer3``, weight 0.5) against the same model
   with torchvision's own aux branch coded in (``aux_loss=True``), same weights and RNG state:
   the losses and the updated parameters agree.
3. **torch.compile** of the eval wrapper: the output matches the bare model.
4. **Timing**: the train step (zero_grad, forward, losses, backward, SGD step) of both sides,
   timed in interleaved rounds after a warm-up; medians in ms, the median of the per-round
   ratios, and the peak memory of one step.

Usage::

    python benchmarks/gpu_check.py                      # needs CUDA; exits 0 with a note without
    python benchmarks/gpu_check.py --device cpu --size 64 --batch 2 --rounds 2 --warmup 1
                                                        # a smoke run of the same code on CPU

Exits 1 if a check fails, 0 otherwise (also when no GPU is present).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NUM_CLASSES = 21
WEIGHT = 0.5  # torchvision's reference segmentation recipe
TAP = "backbone.layer3"
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# Tolerances for "the same step": fp32 allows for non-deterministic CUDA kernels (atomics).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


@dataclass
class Pair:
    reference: nn.Module  # deeplabv3_resnet50(aux_loss=True): the aux branch coded in
    sup: Any  # deepsup.DeepSupervision around deeplabv3_resnet50(aux_loss=False)


def make_pair(device: torch.device) -> Pair:
    from torchvision.models.segmentation import deeplabv3_resnet50

    from deepsup import DeepSupervision

    torch.manual_seed(0)
    kw: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": NUM_CLASSES}
    reference = deeplabv3_resnet50(aux_loss=True, **kw)
    bare = deeplabv3_resnet50(aux_loss=False, **kw)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("aux_")}
    bare.load_state_dict(state)
    sup = DeepSupervision(
        bare,
        {TAP: WEIGHT},
        head=copy.deepcopy(reference.aux_classifier),
        criterion=nn.CrossEntropyLoss(ignore_index=255),
        resize="prediction",
        align_corners=False,  # as torchvision upsamples its aux logits
    )
    return Pair(reference.to(device), sup.to(device))


def batch(device: torch.device, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch_size, size, size), generator=g)
    y[:, :, : max(1, size // 16)] = 255
    return x.to(device), y.to(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def reference_loss(pair: Pair, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    out = pair.reference(x)
    return criterion(out["out"], y) + WEIGHT * criterion(out["aux"], y)


def sup_loss(pair: Pair, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    out, aux = pair.sup(x, target=y)
    return criterion(out["out"], y) + sum(aux.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# checks -------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_eval(pair: Pair, x: torch.Tensor, y: torch.Tensor) -> Check:
    pair.sup.eval()
    pair.reference.eval()
    head_calls: list[int] = []
    handle = pair.sup.heads[TAP].register_forward_hook(lambda *_: head_calls.append(1))
    try:
        with torch.no_grad():
            expected = pair.reference(x)["out"]
            plain = pair.sup(x)
            with_target = pair.sup(x, target=y)
    finally:
        handle.remove()
    ok = (
        set(plain) == {"out"}
        and torch.equal(plain["out"], expected)
        and torch.equal(with_target["out"], expected)
        and not head_calls
    )
    diff = (plain["out"] - expected).abs().max().item()
    return Check("eval passthrough (bit-identical, no head run)", ok, f"max abs diff {diff:.1e}")


def check_train_step(pair: Pair, x: torch.Tensor, y: torch.Tensor, precision: str) -> Check:
    """One SGD step of each side on copies from the same weights and RNG state."""
    dtype = PRECISIONS[precision]
    device = x.device
    pair = Pair(copy.deepcopy(pair.reference).train(), copy.deepcopy(pair.sup).train())
    losses, grads_ok = [], True
    for side, loss_fn in ((pair.reference, reference_loss), (pair.sup, sup_loss)):
        optimizer = torch.optim.SGD(side.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        torch.manual_seed(1)
        with autocast(device, dtype):
            loss = loss_fn(pair, x, y)
        scaler.scale(loss).backward()
        grads_ok &= (
            all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in side.parameters())
            or dtype == torch.float16
        )  # GradScaler skips a step with inf grads on its own
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach().float())
    ref_params = dict(pair.reference.named_parameters())
    param_diff = max(
        (p - ref_params[n]).abs().max().item() for n, p in pair.sup.model.named_parameters()
    )
    loss_diff = (losses[0] - losses[1]).abs().item()
    tol = TOLERANCE[precision]
    ok = (
        bool(torch.isfinite(losses[1]))
        and grads_ok
        and loss_diff <= tol * max(1.0, losses[0].abs().item())
        and param_diff <= tol
    )
    detail = f"loss {losses[1].item():.4f} (diff {loss_diff:.1e}), params max diff {param_diff:.1e}"
    return Check(f"train step {precision} vs hand-written aux", ok, detail)


def check_compile(pair: Pair, x: torch.Tensor, backend: str) -> Check:
    sup = copy.deepcopy(pair.sup).eval()
    reference = pair.reference.eval()
    compiled = torch.compile(sup, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        got = compiled(x)["out"]
        expected = reference(x)["out"]
    seconds = time.perf_counter() - start
    diff = (got - expected).abs().max().item()
    ok = torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
    return Check(
        f"torch.compile(backend={backend!r}) of the eval wrapper",
        ok,
        f"max abs diff {diff:.1e}, first call {seconds:.1f} s",
    )


# timing -------------------------------------------------------------------------------------


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    result: list[int] = []
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    yield result
    if device.type == "cuda":
        sync(device)
        result.append(torch.cuda.max_memory_allocated(device) - base)


def time_train_step(
    pair: Pair,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None,
    args: argparse.Namespace,
) -> list[str]:
    device = x.device
    pair.reference.train()
    pair.sup.train()
    steps: dict[str, Callable[[], None]] = {}
    for name, side, loss_fn in (
        ("hand-written", pair.reference, reference_loss),
        ("deepsup", pair.sup, sup_loss),
    ):
        optimizer = torch.optim.SGD(side.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step(loss_fn: Any = loss_fn, optimizer: Any = optimizer, scaler: Any = scaler) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = loss_fn(pair, x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        steps[name] = step

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    memory = {}
    for name, step in steps.items():
        with peak_memory(device) as peak:
            step()
        memory[name] = f"{peak[0] / 2**20:.0f} MiB" if peak else "n/a"

    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else reversed(order):  # A B, B A, ...
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(
        s / h for h, s in zip(times["hand-written"], times["deepsup"], strict=True)
    )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return [
        f"{ms['hand-written']:.2f}",
        f"{ms['deepsup']:.2f}",
        f"{ratio:.3f}x",
        memory["hand-written"],
        memory["deepsup"],
    ]


# report -------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    p.add_argument("--size", type=int, default=384, help="image side (default 384)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check. "
            "Run it on a machine with a GPU, or `--device cpu` for a smoke run of the same code."
        )
        return 0
    device = torch.device(args.device)
    started = time.perf_counter()
    pair = make_pair(device)
    x, y = batch(device, args.size, args.batch)

    checks = [check_eval(pair, x, y)]
    for precision in PRECISIONS:
        if device.type == "cpu" and precision == "fp16":
            continue  # fp16 autocast with GradScaler is the CUDA recipe
        checks.append(check_train_step(pair, x, y, precision))
    checks.append(check_compile(pair, x, args.compile_backend))

    rows = []
    for precision, dtype in PRECISIONS.items():
        if device.type == "cpu" and precision == "fp16":
            continue
        rows.append([precision, *time_train_step(pair, x, y, dtype, args)])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"## deepsup GPU check: {name}\n")
    print(
        f"torch {torch.__version__}, deeplabv3_resnet50, batch {args.batch} x 3 x {args.size}^2, "
        f"tap {TAP!r} weight {WEIGHT}, {args.rounds} interleaved rounds after {args.warmup} "
        "warm-up steps\n"
    )
    print(
        table(
            ["check", "result", "detail"],
            [[c.name, "pass" if c.ok else "**FAIL**", c.detail] for c in checks],
        )
    )
    print()
    print(
        table(
            [
                "precision",
                "hand-written (ms)",
                "deepsup (ms)",
                "ratio (median)",
                "peak mem hand-written",
                "peak mem deepsup",
            ],
            rows,
        )
    )
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
