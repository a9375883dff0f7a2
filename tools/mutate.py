"""Named mutations of deepsup's core, each run against the fast tests (not part of CI).

Each mutation is ``(name, file, exact source snippet, replacement)``: a bug that the tests must
catch. The tree (``deepsup/``, ``tests/``, ``pyproject.toml``) is copied to a temporary folder
once; every mutant is written there, one at a time, and pytest runs in that copy with
``PYTHONPATH`` set to it, so the working tree is never touched. A mutant is *killed* when the
tests fail, *survived* when they pass, *timeout* when they run past ``--timeout`` (counted as
killed), and *not applicable* when its snippet is not found exactly once (the code moved on:
update or delete the mutation).

Each run is a fork of this process, which imported torch, torchvision and timm once, so a mutant
costs its tests, not the imports (POSIX only).

Usage (from the repository root, in the dev venv; 2-60 s per mutant on 2 shared cores)::

    nice -n 10 python tools/mutate.py                  # all mutations, fast tests
    python tools/mutate.py --list                      # names and whether each applies
    nice -n 10 python tools/mutate.py --only wrapper.tap-resize-ignored resize.floor-to-trunc
    nice -n 10 python tools/mutate.py --pytest-args "-m 'not slow and not distributed' tests"

Survivors that cannot change behaviour (equivalent mutants) are listed in ``EQUIVALENT`` with the
reason; the summary reports them apart from the real survivors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("deepsup", "tests", "pyproject.toml")
# The fast tests minus the integration files whose models are large or that start processes
# (they exercise the same core code far more slowly); new test files are included by default.
HEAVY = (
    "test_amp.py",
    "test_compile.py",
    "test_cuda.py",
    "test_discovery.py",
    "test_distributed.py",
    "test_docs.py",
    "test_example_pspnet_voc.py",
    "test_export.py",
    "test_lightning.py",
    "test_packaging.py",
    "test_pspnet.py",
    "test_zoo.py",
)
# The files that kill most mutants run first (with -x a killed mutant stops at its first failure).
FIRST = ("test_wrapper.py", "test_errors.py")
# The eval passthrough of torchvision and timm models repeats tiny-cnn's check at 10x the cost.
DEFAULT_PYTEST_ARGS = (
    "-q -x -p no:cacheprovider -m 'not slow and not distributed' -k 'not torchvision and not timm'"
)


def _test_paths(tree: Path) -> list[str]:
    """The default test files, in order: FIRST, the other fast files, then the doctests."""
    rest = sorted(p.name for p in (tree / "tests").glob("test_*.py"))
    # test_example_*.py exercise examples/ (not copied into the mutated tree), not the core
    fast = [f for f in rest if f not in FIRST + HEAVY and not f.startswith("test_example_")]
    names = [f for f in FIRST if f in rest] + fast
    return [f"tests/{f}" for f in names] + ["deepsup"]


class Mutation(NamedTuple):
    name: str
    file: str
    snippet: str
    replacement: str


W, C, T, R, S, CH = (
    "deepsup/wrapper.py",
    "deepsup/_capture.py",
    "deepsup/_taps.py",
    "deepsup/_resize.py",
    "deepsup/schedules.py",
    "deepsup/_channels.py",
)

MUTATIONS: list[Mutation] = [
    # wrapper.py -------------------------------------------------------------------------------
    Mutation(
        "wrapper.tap-resize-ignored",
        T,
        "tap_resize = pick(tap.resize, resize)",
        "tap_resize = resize",
    ),
    Mutation(
        "wrapper.tap-align-corners-ignored",
        T,
        "align_corners=bool(pick(tap.align_corners, align_corners)),",
        "align_corners=bool(align_corners),",
    ),
    Mutation(
        "wrapper.tap-calls-ignored",
        T,
        "calls=pick(tap.calls, calls),",
        "calls=calls,",
    ),
    Mutation(
        "wrapper.tap-clone-ignored",
        T,
        "clone=bool(pick(tap.clone, clone)),",
        "clone=bool(clone),",
    ),
    Mutation(
        "wrapper.tap-criterion-ignored",
        T,
        "crit = pick(tap.criterion, criterion)",
        "crit = criterion",
    ),
    Mutation(
        "wrapper.already-wrapped-check-removed",
        W,
        "if isinstance(model, DeepSupervision):",
        "if False:",
    ),
    Mutation(
        "wrapper.feature-info-disabled",
        CH,
        "channels = from_feature_info(model, name)",
        "channels = None",
    ),
    Mutation(
        "wrapper.dry-run-shape-ignored",
        CH,
        "if shape is not None and len(shape) > 1:",
        "if False:",
    ),
    Mutation("wrapper.dry-run-modes-not-restored", C, "m.training = mode", "pass"),
    Mutation(
        "wrapper.dry-run-with-grad",
        C,
        "with torch.no_grad(), window as value:",
        "with window as value:",
    ),
    Mutation(
        "wrapper.shared-head-not-copied",
        W,
        "copy.deepcopy(spec) if uses[id(spec)] > 1 else spec",
        "spec",
    ),
    Mutation("wrapper.tap-criteria-not-registered", W, "if tap_criteria:", "if False:"),
    Mutation("wrapper.raw-not-detached", W, "raw[name] = loss.detach()", "raw[name] = loss"),
    Mutation(
        "wrapper.weight-not-applied",
        W,
        "losses[name] = _weighted(loss, self._weight_values[i])",
        "losses[name] = loss",
    ),
    Mutation(
        "wrapper.first-tap-weight-for-all",
        W,
        "losses[name] = _weighted(loss, self._weight_values[i])",
        "losses[name] = _weighted(loss, self._weight_values[0])",
    ),
    Mutation(
        "wrapper.calls-all-sums", W, "torch.stack(values).mean()", "torch.stack(values).sum()"
    ),
    Mutation(
        "wrapper.eval-under-no-grad",
        W,
        "if not self.training:\n            return self.model(*args, **kwargs)",
        "if not self.training:\n            with torch.no_grad():\n"
        "                return self.model(*args, **kwargs)",
    ),
    Mutation(
        "wrapper.missing-target-check-removed",
        W,
        "if target is None and with_criterion:",
        "if False:",
    ),
    Mutation(
        "wrapper.set-extra-state-no-refresh",
        W,
        "        self.progress = state\n",
        "        self._progress = state\n",
    ),
    Mutation(
        "wrapper.step-ignores-n",
        W,
        "self.progress = self._progress + n",
        "self.progress = self._progress + 1",
    ),
    Mutation(
        "wrapper.progress-validation-removed",
        W,
        'value = check_int("progress", value, minimum=0)',
        "pass",
    ),
    Mutation("wrapper.channel-mismatch-check-removed", CH, "if got != want:", "if False:"),
    Mutation(
        "wrapper.target-dict-first-entry",
        W,
        "return target[name]",
        "return next(iter(target.values()))",
    ),
    Mutation("wrapper.unwrap-keeps-hooks", W, "h.remove()", "pass"),
    Mutation("wrapper.unwrap-flag-not-set", W, "self._unwrapped = True", "self._unwrapped = False"),
    # _capture.py ------------------------------------------------------------------------------
    Mutation(
        "capture.clone-ignored",
        C,
        "if self.clone:\n            tensor = tensor.clone()",
        "if self.clone:\n            pass",
    ),
    Mutation(
        "capture.inplace-check-removed",
        C,
        "if r.version >= 0 and r.tensor._version != r.version:",
        "if False:",
    ),
    Mutation(
        "capture.no-grad-check-removed",
        C,
        "if grad_enabled and not r.grad_enabled and not detach:",
        "if False:",
    ),
    Mutation(
        "capture.detach-ignored",
        C,
        "out.append(r.tensor.detach() if detach else r.tensor)",
        "out.append(r.tensor)",
    ),
    Mutation("capture.first-is-last", C, "records = records[:1]", "records = records[-1:]"),
    Mutation(
        "capture.reuse-check-removed",
        C,
        'if len(records) > 1 and calls == "error":',
        "if False:",
    ),
    Mutation("capture.reentrancy-check-removed", C, "if self.records() is not None:", "if False:"),
    Mutation(
        "capture.window-not-closed-on-error",
        C,
        "        try:\n            yield records\n        finally:\n"
        "            self._local.records = None",
        "        yield records\n        self._local.records = None",
    ),
    Mutation(
        "capture.default-select-last",
        C,
        "if isinstance(output, (tuple, list)) and output:\n        return output[0]",
        "if isinstance(output, (tuple, list)) and output:\n        return output[-1]",
    ),
    Mutation(
        "capture.default-select-dict-none",
        C,
        "return next(iter(output.values()))",
        "return None",
    ),
    Mutation(
        "capture.negative-index-rejected",
        C,
        "-len(output) <= select < len(output)",
        "0 <= select < len(output)",
    ),
    Mutation("capture.select-key-ignored", C, "picked = output.get(select)", "picked = None"),
    Mutation(
        "capture.select-attribute-ignored",
        C,
        "picked = getattr(output, select, None)",
        "picked = None",
    ),
    # _taps.py ---------------------------------------------------------------------------------
    Mutation("taps.same-module-check-removed", T, "if other != name:", "if False:"),
    Mutation("taps.double-match-check-removed", T, "if name in found:", "if False:"),
    Mutation("taps.star-crosses-dots", T, 'out.append(r"[^.]*")', 'out.append(r".*")'),
    Mutation(
        "taps.double-star-within-one",
        T,
        'out.append(".*")\n            i += 2',
        'out.append(r"[^.]*")\n            i += 2',
    ),
    Mutation("taps.question-mark-crosses-dots", T, 'out.append(r"[^.]")', 'out.append(r".")'),
    Mutation("taps.glob-not-anchored", T, '"".join(out) + r"\\Z"', '"".join(out)'),
    Mutation(
        "taps.not-in-module-order",
        T,
        "ordered = sorted(found, key=order.__getitem__)",
        "ordered = list(found)",
    ),
    Mutation("taps.root-tap-allowed", T, 'if pattern == "":', "if False:"),
    Mutation(
        "taps.zero-in-channels-allowed",
        T,
        'check_int("in_channels", self.in_channels)',
        'check_int("in_channels", self.in_channels, minimum=0)',
    ),
    Mutation("taps.no-suggestions", T, "n=3, cutoff=0.6", "n=3, cutoff=1.0"),
    Mutation(
        "taps.default-weight", T, "weight: float | Schedule = 0.4", "weight: float | Schedule = 0.5"
    ),
    # _resize.py -------------------------------------------------------------------------------
    Mutation(
        "resize.nearest-rounds",
        R,
        "torch.arange(size_out, device=device) * size_in, size_out",
        "torch.arange(size_out, device=device) * size_in + size_out // 2, size_out",
    ),
    Mutation(
        "resize.floor-to-trunc",
        R,
        'size_in, size_out, rounding_mode="floor"',
        'size_in, size_out, rounding_mode="trunc"',
    ),
    Mutation(
        "resize.downsample-one-dim", R, "dim = target.dim() - k + i", "dim = target.dim() - k"
    ),
    Mutation(
        "resize.upsample-check-removed",
        R,
        "if any(p > t for p, t in zip(psize, size)):",
        "if False:",
    ),
    Mutation(
        "resize.dense-target-spatial",
        R,
        "return _spatial(target, layout)",
        "return tuple(target.shape[-2:])",
    ),
    Mutation("resize.bicubic", R, '2: "bilinear"', '2: "bicubic"'),
    Mutation(
        "resize.align-corners-dropped",
        R,
        "ac = align_corners if mode.endswith(_ALIGNABLE) else None",
        "ac = False if mode.endswith(_ALIGNABLE) else None",
    ),
    Mutation(
        "resize.none-mismatch-passes",
        R,
        '    raise TargetError(\n        f"tap {tap!r}: prediction of shape',
        "    return pred, target\n"
        '    raise TargetError(\n        f"tap {tap!r}: prediction of shape',
    ),
    Mutation("resize.mode-check-removed", R, "if resize not in RESIZE_MODES:", "if False:"),
    # schedules.py -----------------------------------------------------------------------------
    Mutation(
        "schedules.linear-ignores-end",
        S,
        "return self.start + (self.end - self.start) * self._fraction(step)",
        "return self.start * (1 - self._fraction(step))",
    ),
    Mutation(
        "schedules.fraction-unclamped",
        S,
        "min(max(step, 0), self.total) / self.total",
        "max(step, 0) / self.total",
    ),
    Mutation("schedules.cosine-quarter", S, "math.cos(math.pi * t)", "math.cos(math.pi * t / 2)"),
    Mutation(
        "schedules.cosine-ignores-end",
        S,
        "value = self.end + (self.start - self.end) * 0.5",
        "value = self.start * 0.5",
    ),
    Mutation("schedules.cutoff-off-by-one", S, "step < self.at", "step <= self.at"),
    Mutation(
        "schedules.negative-allowed",
        S,
        "if not math.isfinite(value) or value < 0:",
        "if not math.isfinite(value):",
    ),
    Mutation(
        "schedules.bool-weight-allowed",
        S,
        "if isinstance(weight, bool) or not isinstance(weight, (int, float)):",
        "if not isinstance(weight, (int, float)):",
    ),
    Mutation(
        "schedules.eq-ignores-type",
        S,
        "return type(self) is type(other) and vars(self) == vars(other)",
        "return vars(self) == vars(other)",
    ),
    # _channels.py -----------------------------------------------------------------------------
    Mutation(
        "channels.feature-info-no-underscore-names",
        CH,
        'if e["module"] in (rest, rest.replace(".", "_")):',
        'if e["module"] == rest:',
    ),
    Mutation(
        "channels.feature-info-root-only",
        CH,
        "for i in range(len(parts)):",
        "for i in range(1):",
    ),
    Mutation(
        "channels.first-layer-not-last",
        CH,
        "if c is not None:\n            found = c",
        "if c is not None and found is None:\n            found = c",
    ),
    Mutation(
        "channels.groupnorm-groups", CH, "return int(m.num_channels)", "return int(m.num_groups)"
    ),
    Mutation(
        "channels.tokens-channel-first",
        CH,
        'return -1 if layout == "NHWC" else 1',
        "return 1",
    ),
    # new core logic (ignore-aware labels, weight dtype, checks, read-only taps) --------------
    Mutation(
        "resize.ignore-fallback-removed",
        R,
        "return torch.where(picked == ignore_index, fallback, picked)",
        "return picked",
    ),
    Mutation("resize.ignore-fallback-last-valid", R, 'reduce="amin"', 'reduce="amax"'),
    Mutation(
        "resize.ignore-all-ignored-cell-filled",
        R,
        "fallback = torch.where(first < big, fallback, ignore_index)",
        "fallback = fallback",
    ),
    Mutation(
        "wrapper.weight-half-in-half",
        W,
        "return (loss.float() * weight.float()).to(loss.dtype)",
        "return loss * weight.to(loss.dtype)",
    ),
    Mutation(
        "wrapper.weight-promotes-loss",
        W,
        "return loss * weight.to(dtype=loss.dtype, copy=True)",
        "return loss * weight",
    ),
    Mutation(
        "wrapper.schedule-negative-allowed",
        W,
        "if not ok or not math.isfinite(w) or w < 0:",
        "if not ok or not math.isfinite(w):",
    ),
    Mutation(
        "wrapper.schedule-nonfinite-allowed",
        W,
        "if not ok or not math.isfinite(w) or w < 0:",
        "if not ok or w < 0:",
    ),
    Mutation(
        "checks.target-key-clash-removed",
        "deepsup/_checks.py",
        "if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):",
        "if False:",
    ),
    Mutation(
        "wrapper.head-inplace-check-removed",
        W,
        "if version >= 0 and feat._version != version:",
        "if False:",
    ),
    Mutation("taps.view-writable", W, "self.taps = TapsView(", "self.taps = dict("),
    # killed by test_hardening's keyword-only target clash test
    Mutation(
        "checks.target-key-keyword-only-missed",
        "deepsup/_checks.py",
        "(p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)",
        "(p.POSITIONAL_OR_KEYWORD,)",
    ),
    Mutation(
        "taps.ignore-index-not-inherited",
        T,
        "ignore = found if isinstance(found, int) and not isinstance(found, bool) else None",
        "ignore = None",
    ),
    # killed by the float64 case of test_step_between_forward_and_backward_uses_the_forward_weight
    Mutation(
        "wrapper.weight-not-copied",
        W,
        "weight.to(dtype=loss.dtype, copy=True)",
        "weight.to(dtype=loss.dtype)",
    ),
    # issue 19
    Mutation(
        "balance.bound-never-scales",
        "deepsup/balance.py",
        "return None if scale == 1.0 else rest + scale * aux",
        "return None",
    ),
    Mutation(
        "balance.bound-ratio-inverted",
        "deepsup/balance.py",
        "self.max_ratio * r / a",
        "a / (self.max_ratio * r)",
    ),
    Mutation(
        "balance.pcgrad-projects-agreeing",
        "deepsup/balance.py",
        "if dot < 0 and norm2 > 0:",
        "if norm2 > 0:",
    ),
    Mutation(
        "balance.uncertainty-no-regulariser",
        "deepsup/balance.py",
        "torch.exp(-s) * losses[n] + s for n, s",
        "torch.exp(-s) * losses[n] for n, s",
    ),
]

# Survivors judged equivalent: the mutant cannot change what deepsup computes.
EQUIVALENT: dict[str, str] = {
    "resize.floor-to-trunc": (
        "i * in and out are never negative, and floor and trunc agree on non-negative quotients"
    ),
}


def _apply(text: str, m: Mutation) -> str | None:
    if text.count(m.snippet) != 1:
        return None
    return text.replace(m.snippet, m.replacement)


def _copy_tree(dest: Path, tests_from: str | None) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    if tests_from is not None:  # score an older test suite against the current library
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(
            ["git", "archive", tests_from, "tests"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HYPOTHESIS_PROFILE": "ci",  # derandomized: the same examples for every mutant
}
# Imported once by this process and inherited by every forked test run (never deepsup itself).
PREIMPORT = ("torch", "torchvision", "timm", "hypothesis", "pytest", "numpy")


def _preimport() -> None:
    for name in PREIMPORT:
        with contextlib.suppress(ImportError):
            __import__(name)


def _pytest_argv(tree: Path, pytest_args: str) -> list[str]:
    """The pytest arguments; the default test files unless ``pytest_args`` names paths."""
    args = shlex.split(pytest_args)
    names_paths = any(not a.startswith("-") and (tree / a.split("::")[0]).exists() for a in args)
    return [*args, *([] if names_paths else _test_paths(tree))]


def _run_tests(tree: Path, pytest_args: str, timeout: float) -> tuple[str, float, str]:
    """Run pytest on ``tree`` in a forked child (the heavy imports are already done)."""
    argv = _pytest_argv(tree, pytest_args)
    log = tree / ".mutate-pytest.log"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: a fresh deepsup from the tree, pytest in this process
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(tree)
            sys.path.insert(0, str(tree))
            sys.dont_write_bytecode = True
            import pytest

            code = int(pytest.main(argv))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    rc = None
    while rc is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
        elif time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start, ""
        else:
            time.sleep(0.2)
    seconds = time.monotonic() - start
    lines = log.read_text(errors="replace").strip().splitlines()
    failed = next((ln for ln in lines if ln.startswith(("FAILED", "ERROR"))), "")
    if rc == 0:
        return "survived", seconds, lines[-1] if lines else ""
    if rc == 1:
        return "killed", seconds, failed or (lines[-1] if lines else "")
    return "error", seconds, lines[-1] if lines else f"pytest exit {rc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="mutation names (prefixes work)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--tests-from", default=None, help="take tests/ from this git revision")
    args = parser.parse_args(argv)

    chosen = [
        m for m in MUTATIONS if args.only is None or any(m.name.startswith(o) for o in args.only)
    ]
    if args.list:
        for m in chosen:
            ok = _apply((ROOT / m.file).read_text(), m) is not None
            print(f"{m.name:45s} {m.file:22s} {'applies' if ok else 'NOT APPLICABLE'}")
        return 0

    with tempfile.TemporaryDirectory(prefix="deepsup-mutate-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree, args.tests_from)
        os.environ.update(ENV, PYTHONPATH=str(tree))  # also for the tests' own subprocesses
        _preimport()
        status, seconds, line = _run_tests(tree, args.pytest_args, args.timeout)
        print(f"unmutated tree: {status} in {seconds:.0f} s ({line})", flush=True)
        if status != "survived":
            print("the tests fail without a mutation; fix them first", file=sys.stderr)
            return 2
        results: dict[str, list[str]] = {}
        for i, m in enumerate(chosen, 1):
            path = tree / m.file
            original = path.read_text()
            mutated = _apply(original, m)
            if mutated is None:
                status, seconds, line = "not applicable", 0.0, "snippet not found exactly once"
            else:
                path.write_text(mutated)
                try:
                    status, seconds, line = _run_tests(tree, args.pytest_args, args.timeout)
                finally:
                    path.write_text(original)
            if status == "survived" and m.name in EQUIVALENT:
                status = "equivalent"
            results.setdefault(status, []).append(m.name)
            print(
                f"[{i}/{len(chosen)}] {status:14s} {seconds:5.0f} s  {m.name}  {line}", flush=True
            )

    killed = len(results.get("killed", [])) + len(results.get("timeout", []))
    applied = sum(len(v) for k, v in results.items() if k != "not applicable")
    print(f"\nkilled {killed} / {applied} applied mutants", end="")
    equivalent, skipped = len(results.get("equivalent", [])), len(results.get("not applicable", []))
    print(f" ({equivalent} equivalent, {skipped} not applicable)")
    for status in ("survived", "equivalent", "error", "not applicable"):
        for name in results.get(status, []):
            why = f": {EQUIVALENT[name]}" if status == "equivalent" else ""
            print(f"  {status}: {name}{why}")
    return 1 if results.get("survived") or results.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
