"""Run every benchmark, each in a fresh process, and write ``docs/benchmarks.md``.

    python benchmarks/run_all.py                 # the whole page (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick         # a fast smoke run (numbers are not meaningful)
    python benchmarks/run_all.py --only eval_overhead,taps_scaling --output /tmp/page.md

Timings on a shared machine are noisy: with ``--max-load`` the run waits (up to ``--wait``
seconds) until the 1-minute load average drops below it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import DOCS_PAGE, ROOT, command_line, loadavg, machine, table, verdict

HERE = Path(__file__).resolve().parent

# name -> extra arguments; the order of the page
BENCHMARKS: dict[str, list[str]] = {
    "train_step": [],
    "eval_overhead": [],
    "taps_scaling": [],
    "resize_modes": [],
    "compiled": [],
    "input_pipeline": ["--recipe"],
    "unet": [],
    "exits": [],
}

METHOD = """\
Every number compares two variants measured **in the same process run**, interleaved: the
variants alternate A B, B A, A B, ... (more than two are rotated), after warm-up calls, and each
round gives one paired ratio; the tables show the **median** over rounds with the interquartile
range `[q1, q3]` (and, for the main targets, the min-max). Medians of paired ratios cancel the
slow drifts of a shared machine; single timings do not. A time target is *met* when the
median ratio is within it, *missed* when it is not and the lower quartile is above 1.00x too (an
overhead shows in most rounds), and *not resolved* otherwise: the machine's noise is then larger
than the difference in question, and the taps-scaling table (microseconds the wrapper adds per
forward, whatever the model) bounds it instead. Peak memory is allocator-exact: on CPU
the allocation and free events of `torch.profiler.profile(profile_memory=True)` replayed in time
order (the tensor bytes allocated during the measured call above what was live before it: the
same ops give the same bytes, so these numbers have no noise), on CUDA
`torch.cuda.max_memory_allocated`. Each benchmark runs in a fresh process. The tests never
assert timings; these scripts are the place to look.
"""


def wait_for_load(max_load: float, wait: float) -> None:
    deadline = time.monotonic() + wait
    while os.getloadavg()[0] >= max_load:
        if time.monotonic() >= deadline:
            print(f"load average still {loadavg()} after {wait:.0f} s; running anyway")
            return
        print(f"load average {loadavg()} >= {max_load}; waiting", flush=True)
        time.sleep(30)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few rounds and small sizes, to debug")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {list(BENCHMARKS)}")
    p.add_argument("--output", type=Path, default=DOCS_PAGE, help="the markdown page to write")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every benchmark")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see --help of each")
    p.add_argument("--max-load", type=float, default=None, help="wait for a lower load first")
    p.add_argument("--wait", type=float, default=3600.0, help="seconds to wait at most for it")
    args = p.parse_args(argv)
    names = list(BENCHMARKS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if args.max_load is not None:
        wait_for_load(args.max_load, args.wait)
    facts = machine()
    started = time.perf_counter()
    sections: list[str] = []
    targets: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.md"
            cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out), *BENCHMARKS[name]]
            if args.quick:
                cmd.append("--quick")
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            if args.clock != "wall":
                cmd += ["--clock", args.clock]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            sections.append(out.read_text())
            targets += json.loads(out.with_suffix(".json").read_text())
    facts["load average (1/5/15 min) at the end"] = loadavg()
    facts["total time"] = f"{(time.perf_counter() - started) / 60:.0f} min"
    rows = [[t["what"], t["measured"], t["target"], verdict(t["met"])] for t in targets]
    page = [
        "# Benchmarks",
        "",
        "What deep supervision through deepsup costs against the same aux branch coded into the "
        "model, in time and memory, and what the example's input pipeline delivers. Regenerate "
        "this page with",
        "",
        "```bash",
        command_line(),
        "```",
        "",
        "(see `python benchmarks/run_all.py --help`; every script in `benchmarks/` also runs on "
        "its own and prints its section).",
        "",
        "## Machine",
        "",
        table(["machine", "value"], list(facts.items())),
        "",
        "## Method",
        "",
        METHOD,
    ]
    if args.quick:
        page += [
            "**This page was written by a `--quick` run: the numbers are not meaningful.**",
            "",
        ]
    if rows:
        page += ["## Targets", "", table(["target", "measured", "wanted", "verdict"], rows), ""]
    page += sections
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(page).rstrip() + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
