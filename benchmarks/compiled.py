"""torch.compile: the compiled wrapper vs the compiled bare model (eval) and vs a compiled
hand-written aux branch (train step).

A small segmentation CNN (stride 8, aux head on ``layer2``) keeps compilation to seconds on a
laptop CPU. The wrapper is compiled as a whole (``torch.compile(sup)``), as the docs advise.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    Stats,
    Target,
    emit,
    fmt_bytes,
    fmt_time,
    interleave,
    machine,
    paired,
    parser,
    peak_memory,
    pick,
    setup,
    table,
    time_target,
    tree_equal,
)
from torch import nn

from deepsup import DeepSupervision, heads

NUM_CLASSES = 21
AUX_WEIGHT = 0.4


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinySeg(nn.Module):
    """Stride-8 CNN; with ``aux=True`` it codes the aux branch in, as the seed's PSPNet does.

    The aux variant's training forward takes the labels and returns ``(logits, aux_loss)``,
    so the aux loss is computed inside the compiled graph on both sides of the comparison.
    """

    def __init__(self, aux: bool = False) -> None:
        super().__init__()
        self.stem = _block(3, 16, 2)
        self.layer1 = _block(16, 32, 2)
        self.layer2 = _block(32, 64, 2)
        self.layer3 = _block(64, 128, 1, 2)
        self.cls = nn.Conv2d(128, NUM_CLASSES, 1)
        self.aux = heads.SegHead(64, NUM_CLASSES) if aux else None
        self.criterion = nn.CrossEntropyLoss(ignore_index=255)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        size = x.shape[-2:]
        f = self.layer2(self.layer1(self.stem(x)))
        out = F.interpolate(self.cls(self.layer3(f)), size, mode="bilinear", align_corners=False)
        if self.aux is not None and self.training and y is not None:
            aux = F.interpolate(self.aux(f), size, mode="bilinear", align_corners=False)
            return out, self.criterion(aux, y)
        return out


def graph_report(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Graphs and graph breaks that dynamo sees for one call."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = sorted({str(b.reason).splitlines()[0][:80] for b in explained.break_reasons})
    text = f"{explained.graph_count} graph(s), {explained.graph_break_count} break(s)"
    return text + (f": {'; '.join(reasons)}" if reasons else "")


def first_calls(fn: Callable[[], Any], calls: int = 3) -> tuple[float, int]:
    """Seconds of the first call (compilation; inductor's caches on) and graphs compiled in
    the first ``calls`` calls (more than one per variant is a recompilation)."""
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    for _ in range(calls - 1):
        fn()
    return seconds, counters["unique_graphs"] - before


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=None, help="input side")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 60, 3)
    warmup = pick(args, "warmup", 3, 2)
    size = pick(args, "size", 129, 65)
    torch.manual_seed(0)
    reference = TinySeg(aux=True).to(device)
    model = TinySeg(aux=False).to(device)
    model.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("aux.")}
    )
    bare = copy.deepcopy(model)  # no hooks: the eval baseline
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    sup = DeepSupervision(
        model, {"layer2": AUX_WEIGHT}, head=copy.deepcopy(reference.aux), criterion=criterion
    ).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size, size, size), generator=g).to(device)

    def ref_loss(m: nn.Module) -> torch.Tensor:
        out, aux_loss = m(x, y)
        return criterion(out, y) + AUX_WEIGHT * aux_loss

    def sup_loss(m: nn.Module) -> torch.Tensor:
        out, aux = m(x, target=y)
        return criterion(out, y) + sum(aux.values())

    # train (first, so that the wrapper's first compiled calls are those of a fresh wrapper) ---
    reference.train()
    sup.train()
    torch._dynamo.reset()
    sides = {"hand-written": (reference, ref_loss), "deepsup": (sup, sup_loss)}
    steps = {}
    compiled: dict[str, nn.Module] = {}
    first: dict[str, tuple[float, int]] = {}
    for name, (module, loss_fn) in sides.items():
        cm = compiled[name] = torch.compile(module)
        opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

        def step(
            cm: nn.Module = cm, opt: torch.optim.Optimizer = opt, loss_fn: Any = loss_fn
        ) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(cm).backward()
            opt.step()

        first[name] = first_calls(step)
        steps[name] = step
    losses = {}
    for name, (_, loss_fn) in sides.items():
        torch.manual_seed(3)
        losses[name] = loss_fn(compiled[name])

    def same_text(name: str) -> str:
        diff = (losses[name] - losses["hand-written"]).abs().item()
        return (
            "bitwise" if torch.equal(losses[name], losses["hand-written"]) else f"diff {diff:.1e}"
        )

    times = interleave(steps, rounds=rounds, warmup=warmup, inner=5, device=device)
    peaks = {}
    for name, (module, _) in sides.items():
        module.zero_grad(set_to_none=True)
        peaks[name] = peak_memory(steps[name], device)
    ratio = paired(times, "hand-written", "deepsup")
    mem_ratio = peaks["deepsup"] / peaks["hand-written"]
    targets = [
        time_target("compiled train step time (train-step target)", ratio, 1.01),
        Target(
            "compiled train step peak memory (train-step target)",
            f"{mem_ratio:.4f}x ({peaks['deepsup'] - peaks['hand-written']:+d} B)",
            "<= 1.00x",
            mem_ratio <= 1.0,
        ),
    ]
    train = [
        (
            "train step",
            name,
            first[name],
            times[name],
            "1"
            if name == "hand-written"
            else f"**{paired(times, 'hand-written', name).fmt(digits=4)}**",
            peaks[name],
            "" if name == "hand-written" else same_text(name),
        )
        for name in sides
    ]

    # eval ----------------------------------------------------------------------------------
    bare.load_state_dict(sup.model.state_dict())  # the train steps changed the weights
    bare.eval()
    sup.eval()
    compiled_eval = {"bare": torch.compile(bare), "deepsup": torch.compile(sup)}

    def infer(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            with torch.no_grad():
                m(x)

        return f

    ev = {k: infer(m) for k, m in compiled_eval.items()}
    first_eval = {k: first_calls(f) for k, f in ev.items()}
    with torch.no_grad():
        equal = tree_equal(compiled_eval["bare"](x), compiled_eval["deepsup"](x))
        eager_equal = tree_equal(bare(x), sup(x))
    times = interleave(ev, rounds=rounds, warmup=warmup, inner=20, device=device)
    peaks = {k: peak_memory(f, device) for k, f in ev.items()}
    ratio = paired(times, "bare", "deepsup")
    extra = peaks["deepsup"] - peaks["bare"]
    targets = [
        time_target("compiled eval time (eval target)", ratio, 1.005, digits=4),
        Target("compiled eval extra peak memory", f"{extra:+d} B", "0 B", extra <= 0),
        Target("compiled eval outputs torch.equal", str(equal), "True", equal),
        *targets,
    ]
    evals = [
        (
            "eval",
            name,
            first_eval[name],
            times[name],
            "1" if name == "bare" else f"**{ratio.fmt(digits=4)}**",
            peaks[name],
            "" if name == "bare" else ("yes" if equal else "**no**"),
        )
        for name in compiled_eval
    ]

    # graphs (last: explain resets dynamo) ------------------------------------------------
    graphs = {
        ("eval", "bare"): graph_report(bare, x),
        ("eval", "deepsup"): graph_report(sup, x),
    }
    reference.train()
    sup.train()
    graphs[("train step", "hand-written")] = graph_report(reference, x, y)
    graphs[("train step", "deepsup")] = graph_report(sup, x, target=y)
    rows = [
        [
            mode,
            name,
            f"{first_s:.1f} s",
            str(graphs_compiled),
            graphs[(mode, name)],
            fmt_time(Stats.of(t)),
            r,
            fmt_bytes(peak),
            same_text,
        ]
        for mode, name, (first_s, graphs_compiled), t, r, peak, same_text in evals + train
    ]
    headers = [
        "mode",
        "variant",
        "first call",
        "graphs compiled in 3 calls",
        "dynamo graphs per call",
        "time per call",
        "time ratio (median [IQR])",
        "peak mem",
        "same result",
    ]
    body = (
        f"TinySeg (4 conv-BN-ReLU stages to stride 8, PSPNet-style aux head on `layer2`), input "
        f"{args.batch_size}x3x{size}x{size}, {NUM_CLASSES} classes, `torch.compile` defaults "
        f"(inductor), device {device}, {machine(device)['torch threads']} torch threads; "
        f"{rounds} interleaved rounds (20 eval calls or 5 train steps per sample) after {warmup} "
        "warm-up calls. Eval: the compiled wrapper "
        "vs a compiled hook-free copy of the same model, under `torch.no_grad()` (eager outputs "
        f"equal: {'yes' if eager_equal else 'no'}). Train step: `zero_grad`, compiled forward "
        "(both compute the aux loss inside the compiled forward: the hand-written model "
        "takes the labels and returns `(out, aux_loss)`, as the seed's PSPNet does; the wrapper "
        "returns `(out, aux)`), losses, backward, SGD. The train steps run first, on a fresh "
        "wrapper. 'first call' includes compilation (inductor's on-disk caches on, so a rerun "
        "is faster); 'graphs compiled in 3 calls' counts dynamo's compiled graphs over the "
        "first three calls (above 1: a recompilation); 'dynamo graphs per call' and its breaks "
        "come from `torch._dynamo.explain`; 'same result' "
        "compares the losses of one compiled forward from the same RNG state (eval: outputs "
        "with `torch.equal`).\n\n" + table(headers, rows)
    )
    return emit(args, "torch.compile", body, started=started, targets=targets)


if __name__ == "__main__":
    main()
