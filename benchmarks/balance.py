"""deepsup.balance: one training step of each remedy against plain deep supervision.

The 10-layer plain network of ``examples/deep_plain_net.py`` (width 16, 16x16 inputs, batch 64,
taps on blocks 2, 5 and 7, SGD), one full step (forward, backward, optimizer step) per call:
``ds`` (main + sum of the aux losses), ``ds-bound`` (``GradientBound``), ``ds-uncertainty``
(``UncertaintyWeighting``) and ``ds-pcgrad`` (``project_conflicts`` on the model's
parameters), interleaved; the ratio of each to ``ds`` in the same round, median [IQR].
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from _common import (
    ROOT,
    Stats,
    emit,
    fmt_time,
    interleave,
    machine,
    paired,
    parser,
    pick,
    setup,
    table,
)
from torch import nn

sys.path.insert(0, str(ROOT / "examples"))
from deep_plain_net import PlainNet, parse_args, wrap

from deepsup.balance import GradientBound, UncertaintyWeighting, project_conflicts


def step_fn(variant: str) -> Callable[[], None]:
    """One training step of ``variant`` on a fixed batch."""
    args = parse_args(["--seeds", "0"])
    torch.manual_seed(0)
    model = PlainNet(args.depth, args.width, args.activation, args.init_gain)
    sup = wrap(model, "ds", args, total_steps=1)
    params = list(sup.parameters())
    weighting = None
    if variant == "ds-uncertainty":
        weighting = UncertaintyWeighting(["main", *sup.taps])
        params += list(weighting.parameters())
    if variant == "ds-bound":
        GradientBound(sup, 1.0)
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        out, aux = sup(x, target=y)
        main = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        if variant == "ds-pcgrad":
            project_conflicts(main, aux, list(model.parameters()), list(sup.heads.parameters()))
        elif weighting is not None:
            weighting({"main": main, **aux}).backward()
        else:
            (main + sum(aux.values())).backward()
        optimizer.step()

    return step


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 30, 4)
    names = ("ds", "ds-bound", "ds-uncertainty", "ds-pcgrad")
    times = interleave({n: step_fn(n) for n in names}, rounds=rounds, warmup=args.warmup or 3)
    rows = [[n, fmt_time(Stats.of(times[n])), paired(times, "ds", n).fmt()] for n in names]
    body = table(["variant", "train step (median [IQR])", "time / ds (median [IQR])"], rows)
    info = machine()
    body += f"\n\n{rounds} interleaved rounds; {info.get('cpu', '')}, torch {torch.__version__}, "
    body += f"{torch.get_num_threads()} thread(s)."
    emit(args, "Aux-loss balancing (deepsup.balance): step time", body, started=started)


if __name__ == "__main__":
    main()
