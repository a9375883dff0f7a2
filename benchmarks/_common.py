"""Shared code of the benchmarks: interleaved timing, peak memory, machine facts, markdown.

Every benchmark compares variants *within one process run*: the variants are timed in
alternating order (A B, B A, A B, ... for two; rotated and reversed rounds for more), after a
warm-up, and each round gives one paired ratio. The reported number is the median over rounds,
with the interquartile range beside it, so slow drifts of a shared machine cancel out of the
ratio. Peak memory is allocator-exact: on CPU the profiler's allocation events
(``torch.profiler.profile(profile_memory=True)``) replayed in time order, on CUDA
``torch.cuda.max_memory_allocated``. Both count the tensor memory allocated *during* the
measured call above what was live when it started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"


# statistics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Median, quartiles and range of a sample."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        v = sorted(values)
        if not v:
            raise ValueError("no values")
        if len(v) == 1:
            return cls(v[0], v[0], v[0], v[0], v[0], 1)
        q1, med, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(med, q1, q3, v[0], v[-1], len(v))

    def fmt(self, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
        """``median [q1, q3]`` after multiplying by ``scale``."""
        f = f"{{:.{digits}f}}"
        m, a, b = (f.format(x * scale) for x in (self.median, self.q1, self.q3))
        return f"{m}{unit} [{a}, {b}]"


def fmt_time(stats: Stats) -> str:
    """A per-call time with a unit that fits its size: ``12.3 ms [12.1, 12.6]``."""
    m = stats.median
    if m >= 1.0:
        return stats.fmt(1.0, 3, " s")
    if m >= 1e-3:
        return stats.fmt(1e3, 1 if m >= 1e-2 else 2, " ms")
    return stats.fmt(1e6, 1, " µs")


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def paired(times: Mapping[str, Sequence[float]], base: str, other: str) -> Stats:
    """Per-round ratios ``other / base`` (both timed in the same round, next to each other)."""
    return Stats.of([b / a for a, b in zip(times[base], times[other], strict=True)])


def paired_diff(times: Mapping[str, Sequence[float]], base: str, other: str) -> Stats:
    """Per-round differences ``other - base`` in seconds."""
    return Stats.of([b - a for a, b in zip(times[base], times[other], strict=True)])


def verdict(met: bool | None) -> str:
    if met is None:
        return "not resolved (noise: the IQR includes 1.00x)"
    return "met" if met else "**missed**"


def ratio_met(stats: Stats, target: float) -> bool | None:
    """A time ratio's verdict: met if the median is within ``target``; missed if not and the
    lower quartile is above 1 too (an overhead shows in most rounds); else not resolved (the
    machine's noise is larger than the difference to resolve)."""
    if stats.median <= target:
        return True
    return False if stats.q1 > 1.0 else None


def time_target(what: str, stats: Stats, target: float, digits: int = 3) -> Target:
    return Target(
        what,
        f"{stats.median:.{digits}f}x [{stats.q1:.{digits}f}, {stats.q3:.{digits}f}]",
        f"<= {target}x",
        ratio_met(stats, target),
    )


# timing -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = "wall"  # set by setup() from --clock


def interleave(
    variants: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 2,
    inner: int = 1,
    device: torch.device | str = "cpu",
    clock: str | None = None,
) -> dict[str, list[float]]:
    """Time ``variants`` in interleaved rounds; return seconds per call for each round.

    Two variants run as A B, B A, A B, ... (so A B B A A B ...); more are rotated by one each
    pair of rounds and every other round is reversed, so each variant sits in each position
    equally often. Each sample is ``inner`` calls timed together (divided by ``inner``). The
    garbage collector is run before and disabled during each sample, as ``timeit`` does.
    ``clock`` is ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: this
    process's CPU time, which leaves out the time other processes take from a busy machine; use
    it with one torch thread, since with more it also counts OpenMP's spin-waiting); the
    default is the ``--clock`` option.
    """
    device = torch.device(device)
    now = CLOCKS[clock or _clock]
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = (r // 2) % len(names)
        order = names[shift:] + names[:shift]
        if r % 2:
            order = order[::-1]
        for name in order:
            fn = variants[name]
            gc.collect()
            gc.disable()
            try:
                synchronize(device)
                t0 = now()
                for _ in range(inner):
                    fn()
                synchronize(device)
                dt = now() - t0
            finally:
                gc.enable()
            times[name].append(dt / inner)
    return times


# memory -----------------------------------------------------------------------------------

_CPU_TYPES = ("CPU", "MKLDNN", "IDEEP")


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak tensor bytes allocated by ``fn()`` above the level live when it starts.

    CPU: replays the allocation and free events of ``torch.profiler`` (``profile_memory=True``)
    in time order; exact for tensors from PyTorch's CPU allocator, deterministic from run to
    run. CUDA: ``torch.cuda.max_memory_allocated`` after a reset. ``fn``'s return value is
    dropped inside the measurement, so return nothing that should count as freed.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=activities, profile_memory=True) as prof,
    ):
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and str(e.device_type()).split(".")[-1] in _CPU_TYPES
    ]
    events.sort(key=lambda e: e[0])  # stable: ties keep the recorded order
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints a banner on every profiler start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# machine and markdown ---------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict[str, str]:
    """The facts a reader needs to compare numbers: hardware, versions, date, load."""
    device = torch.device(device)
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover
        tv = "-"
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    facts = {
        "cpu": f"{cpu_model()} ({usable} usable of {cores} logical cores)",
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "os": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load average (1/5/15 min) at start": loadavg(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def split_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, at: int, keys: int = 1
) -> str:
    """A wide table as two: the columns before ``at``, then the first ``keys`` columns again
    with the rest. The documentation page is about 940 px wide at a 1280 px window: a table of
    more than about eight columns of numbers scrolls sideways there (tests/test_site.py)."""
    first = table(headers[:at], [row[:at] for row in rows])
    rest = [[*row[:keys], *row[at:]] for row in rows]
    return first + "\n\n" + table([*headers[:keys], *headers[at:]], rest)


def command_line() -> str:
    """The command that ran this script, as a reader would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(ROOT))
    except ValueError:
        shown = str(script)
    args = list(sys.argv[1:])
    for option in ("--out", "--output"):  # where the markdown goes: not part of the benchmark
        if option in args:
            i = args.index(option)
            del args[i : i + 2]
    return shlex.join(["python", shown, *args])


# command line -----------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default: per script)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant")
    p.add_argument("--quick", action="store_true", help="few rounds and small sizes, to debug")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a busy machine; "
        "use with --threads 1)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the markdown section here")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    global _clock
    _clock = args.clock
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def pick(args: argparse.Namespace, name: str, default: int, quick: int) -> int:
    value = getattr(args, name)
    if value is not None:
        return int(value)
    return quick if args.quick else default


@dataclass(frozen=True)
class Target:
    """One checked target: what, the measured value, the target, met or not."""

    what: str
    measured: str
    target: str
    met: bool | None  # None: not resolved by this measurement


def emit(
    args: argparse.Namespace,
    title: str,
    body: str,
    *,
    started: float,
    targets: Sequence[Target] = (),
) -> str:
    """Print the section and write it to ``--out`` (its targets to the same path + ``.json``)."""
    clock = "" if args.clock == "wall" else f"; clock: {args.clock} (process CPU time)"
    section = (
        f"## {title}\n\n"
        f"`{command_line()}` (took {time.perf_counter() - started:.0f} s; "
        f"load average at the end {loadavg()}{clock})\n\n{body.strip()}\n"
    )
    print(section)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(section)
        data = [dict(t.__dict__, section=title) for t in targets]
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    return section


def tree_equal(a: Any, b: Any) -> bool:
    """``torch.equal`` through tensors, sequences and mappings."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def load_seed_pspnet() -> Any:
    """``tests/_seed_pspnet.py`` (the seed's PSPNet with its aux branch coded in), by path."""
    import importlib.util

    path = ROOT / "tests" / "_seed_pspnet.py"
    spec = importlib.util.spec_from_file_location("_seed_pspnet", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
