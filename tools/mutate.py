"""Named mutations of deepsup's core, each run against the fast tests (not part of CI).

Each mutation is ``(name, file, exact source snippet, replacement)``: a bug that the tests must
catch. The tree (``deepsup/``, ``tests/``, ``pyproject.toml``) is copied to a temporary folder
once; every mutant is written there, one at a time, and pytest runs in that copy with
``PYTHONPATH`` set to it, so the working tree is never touched. A mutant is *killed* when the
tests fail, *survived* when they pass, *timeout* when they run past ``--timeout`` (counted as
killed), and *not applicable* when its snippet is not found exactly once (the code moved on:
update or delete the mutation).

The mutations cover the core (``wrapper``, ``_config``, ``_names``, ``_capture``, ``_build``,
``_weights``, ``functional``, ``_targets``, ``_layout``, ``schedules``) and the features built on
it (``exits``, ``_calibration``, ``losses``, ``diagnostics``, ``multiscale``, ``heads``).

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
FIRST = ("test_core_rules.py", "test_wrapper.py", "test_errors.py")
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


W, C, S = "deepsup/wrapper.py", "deepsup/_capture.py", "deepsup/schedules.py"
CFG, N, B = "deepsup/_config.py", "deepsup/_names.py", "deepsup/_build.py"
F, TG, L = "deepsup/functional.py", "deepsup/_targets.py", "deepsup/_layout.py"
WT, X, CAL = "deepsup/_weights.py", "deepsup/exits.py", "deepsup/_calibration.py"
LO, D, MS, H = (
    "deepsup/losses.py",
    "deepsup/diagnostics.py",
    "deepsup/multiscale.py",
    "deepsup/heads.py",
)

MUTATIONS: list[Mutation] = [
    # wrapper.py -----------------------------------------------------------------------------------
    Mutation(
        "wrapper.tap-resize-ignored",
        CFG,
        "tap_resize = pick(tap.resize, resize)",
        "tap_resize = resize",
    ),
    Mutation(
        "wrapper.tap-align-corners-ignored",
        CFG,
        "align_corners=bool(pick(tap.align_corners, align_corners)),",
        "align_corners=bool(align_corners),",
    ),
    Mutation("wrapper.tap-calls-ignored", CFG, "calls=pick(tap.calls, calls),", "calls=calls,"),
    Mutation(
        "wrapper.tap-clone-ignored",
        CFG,
        "clone=bool(pick(tap.clone, clone)),",
        "clone=bool(clone),",
    ),
    Mutation(
        "wrapper.tap-criterion-ignored",
        CFG,
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
        L,
        "stage, fmt, count = _timm(model, name)",
        "stage, fmt, count = False, None, None",
    ),
    Mutation("wrapper.dry-run-shape-ignored", B, "shape=shapes.get(name),", "shape=None,"),
    Mutation("wrapper.dry-run-modes-not-restored", C, "m.training = mode", "pass"),
    Mutation(
        "wrapper.dry-run-with-grad",
        C,
        "with torch.no_grad(), window as value:",
        "with window as value:",
    ),
    Mutation(
        "wrapper.shared-head-not-copied",
        B,
        "head = copy.deepcopy(spec) if copied else spec",
        "head = spec",
    ),
    Mutation("wrapper.tap-criteria-not-registered", W, "if tap_criteria:", "if False:"),
    Mutation("wrapper.raw-not-detached", W, "raw[name] = loss.detach()", "raw[name] = loss"),
    Mutation(
        "wrapper.weight-not-applied",
        W,
        "losses[name] = DF.weighted(loss, self._weight_values[i])",
        "losses[name] = loss",
    ),
    Mutation(
        "wrapper.first-tap-weight-for-all",
        W,
        "losses[name] = DF.weighted(loss, self._weight_values[i])",
        "losses[name] = DF.weighted(loss, self._weight_values[0])",
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
    Mutation("wrapper.channel-mismatch-check-removed", B, "if got != want:", "if False:"),
    Mutation(
        "wrapper.target-dict-first-entry",
        W,
        "return target[name]",
        "return next(iter(target.values()))",
    ),
    Mutation("wrapper.unwrap-keeps-hooks", W, "h.remove()", "pass"),
    Mutation("wrapper.unwrap-flag-not-set", W, "self._unwrapped = True", "self._unwrapped = False"),
    # _capture.py ----------------------------------------------------------------------------------
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
    Mutation("capture.first-is-last", C, "return range(1)", "return range(count - 1, count)"),
    Mutation("capture.reuse-check-removed", C, 'if count > 1 and calls == "error":', "if False:"),
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
        F,
        "if isinstance(output, (tuple, list)) and output:\n        return output[0]",
        "if isinstance(output, (tuple, list)) and output:\n        return output[-1]",
    ),
    Mutation(
        "capture.default-select-dict-none", F, "return next(iter(output.values()))", "return None"
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
    # _names.py, _config.py ------------------------------------------------------------------------
    Mutation("taps.same-module-check-removed", N, "if other != name:", "if False:"),
    Mutation("taps.double-match-check-removed", N, "if name in found:", "if False:"),
    Mutation("taps.star-crosses-dots", N, 'out.append(r"[^.]*")', 'out.append(r".*")'),
    Mutation(
        "taps.double-star-within-one",
        N,
        'out.append(".*")\n            i += 2',
        'out.append(r"[^.]*")\n            i += 2',
    ),
    Mutation("taps.question-mark-crosses-dots", N, 'out.append(r"[^.]")', 'out.append(r".")'),
    Mutation("taps.glob-not-anchored", N, '"".join(out) + r"\\Z"', '"".join(out)'),
    Mutation(
        "taps.not-in-module-order",
        N,
        "ordered = sorted(found, key=order.__getitem__)",
        "ordered = list(found)",
    ),
    Mutation("taps.root-tap-allowed", N, 'if pattern == "":', "if False:"),
    Mutation(
        "taps.zero-in-channels-allowed",
        CFG,
        'check_int("in_channels", self.in_channels)',
        'check_int("in_channels", self.in_channels, minimum=0)',
    ),
    Mutation("taps.no-suggestions", N, "n=3, cutoff=0.6", "n=3, cutoff=1.0"),
    Mutation(
        "taps.default-weight",
        CFG,
        "weight: float | Schedule = 0.4",
        "weight: float | Schedule = 0.5",
    ),
    # functional.py, _targets.py -------------------------------------------------------------------
    Mutation(
        "resize.nearest-rounds",
        TG,
        "torch.arange(size_out, device=device) * size_in, size_out",
        "torch.arange(size_out, device=device) * size_in + size_out // 2, size_out",
    ),
    Mutation(
        "resize.floor-to-trunc",
        TG,
        'size_in, size_out, rounding_mode="floor"',
        'size_in, size_out, rounding_mode="trunc"',
    ),
    Mutation(
        "resize.downsample-one-dim",
        TG,
        "dim = target.dim() - len(size) + i",
        "dim = target.dim() - len(size)",
    ),
    Mutation(
        "resize.upsample-check-removed",
        F,
        "if any(p > t for p, t in zip(psize, size)):",
        "if False:",
    ),
    Mutation(
        "resize.dense-target-spatial",
        F,
        "return spatial_size(target, layout)",
        "return tuple(target.shape[-2:])",
    ),
    Mutation("resize.bicubic", F, '2: "bilinear"', '2: "bicubic"'),
    Mutation(
        "resize.align-corners-dropped",
        F,
        'ac = align_corners if mode.endswith(("linear", "bicubic")) else None',
        'ac = False if mode.endswith(("linear", "bicubic")) else None',
    ),
    Mutation(
        "resize.none-mismatch-passes",
        F,
        '    raise TargetError(\n        f"{_where(tap)}prediction of shape',
        "    return prediction, target\n"
        '    raise TargetError(\n        f"{_where(tap)}prediction of shape',
    ),
    Mutation("resize.mode-check-removed", CFG, "if resize not in RESIZE_MODES:", "if False:"),
    # schedules.py ---------------------------------------------------------------------------------
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
    # _layout.py -----------------------------------------------------------------------------------
    Mutation(
        "channels.feature-info-no-underscore-names",
        L,
        'e.get("module") in (rest, rest.replace(".", "_"))',
        'e.get("module") == rest',
    ),
    Mutation(
        "channels.feature-info-root-only", L, "for i in range(len(parts)):", "for i in range(1):"
    ),
    Mutation(
        "channels.first-layer-not-last",
        L,
        "last = next((c for _, c in reversed(layers) if c is not None), None)",
        "last = next((c for _, c in layers if c is not None), None)",
    ),
    Mutation(
        "channels.groupnorm-groups",
        L,
        'return "NCHW", int(m.num_channels)',
        'return "NCHW", int(m.num_groups)',
    ),
    Mutation(
        "channels.tokens-channel-first", L, 'return -1 if layout == "NHWC" else 1', "return 1"
    ),
    # new core logic (ignore-aware labels, weight dtype, checks, read-only taps) --------------
    Mutation(
        "resize.ignore-fallback-removed",
        TG,
        "return torch.where(picked == ignore_index, fallback, picked)",
        "return picked",
    ),
    Mutation("resize.ignore-fallback-last-valid", TG, 'reduce="amin"', 'reduce="amax"'),
    Mutation(
        "resize.ignore-all-ignored-cell-filled",
        TG,
        "fallback = torch.where(first < big, fallback, ignore_index)",
        "fallback = fallback",
    ),
    Mutation(
        "wrapper.weight-half-in-half",
        F,
        "return (loss.float() * weight.float()).to(loss.dtype)",
        "return loss * weight.to(loss.dtype)",
    ),
    Mutation(
        "wrapper.weight-promotes-loss",
        F,
        "return loss * weight.to(dtype=loss.dtype, copy=True)",
        "return loss * weight",
    ),
    Mutation(
        "wrapper.schedule-negative-allowed",
        WT,
        "if not is_number(w) or not math.isfinite(float(w)) or float(w) < 0:",
        "if not is_number(w) or not math.isfinite(float(w)):",
    ),
    Mutation(
        "wrapper.schedule-nonfinite-allowed",
        WT,
        "if not is_number(w) or not math.isfinite(float(w)) or float(w) < 0:",
        "if not is_number(w) or float(w) < 0:",
    ),
    Mutation(
        "checks.target-key-clash-removed",
        CFG,
        "if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):",
        "if False:",
    ),
    Mutation(
        "wrapper.head-inplace-check-removed",
        B,
        "if version >= 0 and feat._version != version:",
        "if False:",
    ),
    Mutation("taps.view-writable", W, "self.taps = TapsView(", "self.taps = dict("),
    # killed by test_hardening's keyword-only target clash test
    Mutation(
        "checks.target-key-keyword-only-missed",
        CFG,
        "(p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)",
        "(p.POSITIONAL_OR_KEYWORD,)",
    ),
    Mutation(
        "taps.ignore-index-not-inherited",
        CFG,
        "ignore = _criterion_ignore_index(crit)",
        "ignore = None",
    ),
    # killed by the float64 case of test_step_between_forward_and_backward_uses_the_forward_weight
    Mutation(
        "wrapper.weight-not-copied",
        F,
        "weight.to(dtype=loss.dtype, copy=True)",
        "weight.to(dtype=loss.dtype)",
    ),
    # issue 16: the modules of the core redesign, exits, calibration, losses, diagnostics -----
    # functional.py: the target cache (pyramid), the teacher, the criterion, the class axis
    Mutation(
        "functional.cache-key-no-ignore-index",
        F,
        "key: tuple[Any, ...] = (id(target), psize, mode, layout, ignore_index)",
        "key: tuple[Any, ...] = (id(target), psize, mode, layout)",
    ),
    Mutation(
        "functional.cache-key-no-layout",
        F,
        "key: tuple[Any, ...] = (id(target), psize, mode, layout, ignore_index)",
        "key: tuple[Any, ...] = (id(target), psize, mode, ignore_index)",
    ),
    Mutation(
        "functional.cache-key-no-dtype",
        F,
        "key += (classes, prediction.dtype)",
        "key += (classes,)",
    ),
    Mutation(
        "functional.cache-key-no-classes",
        F,
        "key += (classes, prediction.dtype)",
        "key += (prediction.dtype,)",
    ),
    Mutation(
        "functional.teacher-downsampled-channels-first",
        F,
        "return downsample(teacher, psize, layout=layout, tap=tap)",
        "return downsample(teacher, psize, tap=tap)",
    ),
    Mutation(
        "functional.teacher-upsampled-channels-first",
        F,
        "return upsample(teacher, psize, layout=layout, align_corners=align_corners, tap=tap)",
        "return upsample(teacher, psize, align_corners=align_corners, tap=tap)",
    ),
    Mutation("functional.teacher-not-detached", F, "teacher = teacher.detach()", "pass"),
    Mutation(
        "functional.teacher-class-check-removed",
        F,
        "or (prediction.dim() >= 2 and teacher.shape[c] != prediction.shape[c])",
        "or False",
    ),
    Mutation(
        "functional.larger-teacher-interpolated",
        F,
        "if all(t >= p for t, p in zip(tsize, psize)):",
        "if False:",
    ),
    Mutation(
        "functional.all-ignored-batch-nan",
        F,
        "loss = torch.where((tgt != ignore).any(), loss, 0.0)",
        "pass",
    ),
    Mutation(
        "functional.bfloat16-weight-in-bfloat16",
        F,
        "if loss.dtype in (torch.float16, torch.bfloat16):",
        "if loss.dtype == torch.float16:",
    ),
    Mutation(
        "functional.soft-without-classes-allowed",
        F,
        'if num_classes is None and interpolation == "soft" and not dense:',
        "if False:",
    ),
    Mutation(
        "functional.max-default-classes-off-by-one",
        F,
        "int(target.max()) + 1 if target.numel() else 1",
        "int(target.max()) if target.numel() else 1",
    ),
    Mutation(
        "functional.dense-target-layout-ignored",
        F,
        "x = channels_first(target, layout) if dense else target",
        "x = target",
    ),
    Mutation(
        "functional.classes-at-dim-1",
        F,
        "classes = prediction.shape[channel_dim(layout)]",
        "classes = prediction.shape[1]",
    ),
    Mutation(
        "functional.target-not-moved-for-criterion",
        F,
        "target = _moved(target, layout, want, dims)",
        "pass",
    ),
    Mutation(
        "functional.layout-keyword-before-move",
        F,
        'kwargs["layout"] = given',
        'kwargs["layout"] = layout',
    ),
    Mutation(
        "functional.kl-direction-swapped",
        F,
        "kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)",
        "kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)",
    ),
    Mutation(
        "functional.kl-without-t-squared",
        F,
        "return temperature**2 * kl.mean()",
        "return kl.mean()",
    ),
    Mutation(
        "functional.binary-probability-one-sided",
        F,
        "return _per_sample(x[:, 0].abs().sigmoid())",
        "return _per_sample(x[:, 0].sigmoid())",
    ),
    Mutation(
        "functional.entropy-not-normalised",
        F,
        "return _per_sample(1.0 - h / math.log(log_p.shape[1]))",
        "return _per_sample(1.0 - h)",
    ),
    # _targets.py: the max / soft rules next to an ignore label, the cells
    Mutation(
        "targets.ignore-label-counted-as-class",
        TG,
        "return valid if ignore_index is None else valid & (target != ignore_index)",
        "return valid",
    ),
    Mutation(
        "targets.max-class-0-not-valid",
        TG,
        "torch.where(best >= 0, best, whole)",
        "torch.where(best > 0, best, whole)",
    ),
    Mutation(
        "targets.soft-empty-cell-nan",
        TG,
        "torch.where(count > 0, share / count.clamp_min(torch.finfo(dtype).tiny), 0.0)",
        "share / count",
    ),
    Mutation(
        "targets.soft-over-all-pixels",
        TG,
        "torch.where(count > 0, share / count.clamp_min(torch.finfo(dtype).tiny), 0.0)",
        "share",
    ),
    Mutation(
        "targets.num-classes-label-valid",
        TG,
        "(target >= 0) & (target < num_classes)",
        "(target >= 0) & (target <= num_classes)",
    ),
    Mutation(
        "targets.cell-of-pixel-rounds-down",
        TG,
        'cell = torch.div((j + 1) * n_out + n_in - 1, n_in, rounding_mode="floor") - 1',
        'cell = torch.div(j * n_out, n_in, rounding_mode="floor")',
    ),
    Mutation(
        "targets.max-dense-averaged",
        TG,
        "return _pool(_MAX, x, size).to(target.dtype)",
        "return _pool(_AVG, x, size).to(target.dtype)",
    ),
    # _layout.py: one layout per tap
    Mutation(
        "layout.head-overrides-declared",
        L,
        "layout = declared or head_declared or inferred",
        "layout = head_declared or declared or inferred",
    ),
    Mutation(
        "layout.head-contradiction-check-removed",
        L,
        "and (shape[1] in ev.counts) != (shape[-1] in ev.counts)",
        "and False",
    ),
    Mutation(
        "layout.head-does-not-settle-ambiguity",
        L,
        "if settled is not None:\n            return settled",
        "if False:\n            return settled",
    ),
    Mutation(
        "layout.previous-layer-for-any-module",
        L,
        "hint = own or (previous if _passes_through(module) else None)",
        "hint = own or previous",
    ),
    Mutation(
        "layout.timm-output-fmt-ignored",
        L,
        "if ev.timm_fmt is not None:\n        return ev.timm_fmt",
        "if False:\n        return ev.timm_fmt",
    ),
    Mutation(
        "layout.concat-ignores-layout-flowing-in",
        L,
        "if default is None and not first and ev.previous is not None:",
        "if False:",
    ),
    Mutation(
        "layout.shape-channels-at-dim-1",
        L,
        "return Resolved(layout, int(shape[channel_dim(layout)]))",
        "return Resolved(layout, int(shape[1]))",
    ),
    Mutation(
        "layout.mixed-layers-take-last",
        L,
        "layers[-1][0] if len(layouts) == 1 else None",
        "layers[-1][0]",
    ),
    # _config.py: Tap resolution and checks
    Mutation(
        "config.soft-with-criterion-ignore-index-allowed",
        CFG,
        'if interp == "soft" and own is not None and own != -100:',
        "if False:",
    ),
    Mutation(
        "config.interpolation-inherited-with-resize-none",
        CFG,
        "inherited = interpolation if tap_resize is not None else None",
        "inherited = interpolation",
    ),
    Mutation("config.detach-dropped", CFG, "detach=bool(tap.detach),", "detach=False,"),
    Mutation("config.select-dropped", CFG, "select=tap.select,", "select=None,"),
    Mutation("config.tap-layout-dropped", CFG, "layout=pick(tap.layout, None),", "layout=None,"),
    Mutation("config.explicit-ignore-index-overridden", CFG, "if ignore is INHERIT:", "if True:"),
    # _capture.py, _build.py, _weights.py
    Mutation(
        "capture.last-is-second-last",
        C,
        "return range(count - 1, count)",
        "return range(max(count - 2, 0), max(count - 1, 1))",
    ),
    Mutation(
        "capture.dry-run-in-train-mode",
        C,
        "        model.eval()\n        with torch.no_grad(), window as value:",
        "        with torch.no_grad(), window as value:",
    ),
    Mutation(
        "build.in-channels-ignored",
        B,
        "count = s.in_channels if s.in_channels is not None else channels",
        "count = channels",
    ),
    Mutation(
        "build.factory-not-told-layout",
        B,
        "head = spec(count, layout=layout) if adapt else spec(count)",
        "head = spec(count)",
    ),
    Mutation(
        "build.prediction-layout-is-input-layout",
        B,
        "pred_layout = built_out or head_out or layout",
        "pred_layout = layout",
    ),
    Mutation(
        "build.unbatched-check-removed",
        B,
        "if all(len(s) < 1 or s[0] != x.shape[0] for s in shapes.values()):",
        "if False:",
    ),
    Mutation(
        "build.channels-checked-at-dim-1",
        B,
        "got = feat.shape[channel_dim(layout)]",
        "got = feat.shape[1]",
    ),
    Mutation(
        "weights.buffer-float32",
        WT,
        "dtype=torch.float64, device=device",
        "dtype=torch.float32, device=device",
    ),
    # exits.py: a threshold equal to a confidence, the thresholds, the calls rule
    Mutation(
        "exits.threshold-equal-to-confidence-stays",
        X,
        "return self.early._confidence(self.name, pred) >= threshold",
        "return self.early._confidence(self.name, pred) > threshold",
    ),
    Mutation(
        "exits.one-confident-sample-exits",
        X,
        "bool(self._leave(call, pred, threshold).all())",
        "bool(self._leave(call, pred, threshold).any())",
    ),
    Mutation(
        "exits.nan-threshold-allowed",
        X,
        "bad = {t: v for t, v in out.items() if math.isnan(v)}",
        "bad: dict[str, float] = {}",
    ),
    Mutation(
        "exits.left-out-tap-threshold-0",
        X,
        "float(threshold.get(t, math.inf))",
        "float(threshold.get(t, 0.0))",
    ),
    Mutation(
        "exits.calls-first-takes-second",
        X,
        '(rule == "first" and n > 1)',
        '(rule == "first" and n > 2)',
    ),
    Mutation(
        "exits.calls-last-takes-first",
        X,
        ' or (rule == "last" and n != call.counts.get(self.name)):',
        ":",
    ),
    Mutation(
        "exits.extra-state-length-unchecked",
        X,
        "state.shape not in ((k,), (2, k))",
        "state.dim() not in (1, 2)",
    ),
    Mutation(
        "exits.off-exit-runs-its-head",
        X,
        "if threshold == math.inf:\n            return None",
        "if False:\n            return None",
    ),
    # _calibration.py: ties at a threshold, the cost accounting, the search
    Mutation(
        "calibration.threshold-equal-to-confidence-stays",
        CAL,
        "fired = conf >= thresholds[:, None]",
        "fired = conf > thresholds[:, None]",
    ),
    Mutation(
        "calibration.own-head-counted-twice",
        CAL,
        "before = torch.cumsum(head * on, 0) - head * on",
        "before = torch.cumsum(head * on, 0)",
    ),
    Mutation(
        "calibration.off-exits-heads-counted",
        CAL,
        "on = torch.tensor([x < math.inf for x in t] + [False])",
        "on = torch.tensor([True for x in t] + [False])",
    ),
    Mutation(
        "calibration.path-runs-off-heads",
        CAL,
        "e: _NEVER for e in self.order[:stop] if thresholds.get(e, math.inf) < math.inf",
        "e: _NEVER for e in self.order[:stop]",
    ),
    Mutation(
        "calibration.output-path-without-heads",
        CAL,
        "stop = len(self.order) if exit_name == OUTPUT else self.order.index(exit_name)",
        "stop = 0 if exit_name == OUTPUT else self.order.index(exit_name)",
    ),
    Mutation(
        "calibration.max-drop-relative",
        CAL,
        "floor = float(score[-1].mean()) - (max_drop or 0.0) - 1e-9",
        "floor = float(score[-1].mean()) * (1 - (max_drop or 0.0)) - 1e-9",
    ),
    Mutation(
        "calibration.nan-confidences-in-quantiles",
        CAL,
        "finite = finite[~finite.isnan()]",
        "pass",
    ),
    Mutation(
        "calibration.top1-single-logit-argmax",
        CAL,
        "(x[:, 0] > 0).long() if x.dim() >= 2 and x.shape[1] == 1 else x.argmax(1)",
        "x.argmax(1)",
    ),
    Mutation(
        "calibration.metric-ignores-exit-layout",
        CAL,
        "e: functools.partial(top1, layout=lay) for e, lay in layouts.items()",
        "e: top1 for e, lay in layouts.items()",
    ),
    Mutation(
        "calibration.costs-on-whole-batch",
        CAL,
        "        return x[:1]\n",
        "        return x\n",
    ),
    # losses.py
    Mutation(
        "losses.alpha-swapped",
        LO,
        "return (1.0 - self.alpha) * hard + self.alpha * soft",
        "return self.alpha * hard + (1.0 - self.alpha) * soft",
    ),
    Mutation(
        "losses.teacher-layout-dropped",
        LO,
        "soft = distillation_kl(prediction, teacher.detach(), self.temperature, layout=layout)",
        "soft = distillation_kl(prediction, teacher.detach(), self.temperature)",
    ),
    Mutation(
        "losses.ignore-index-not-forwarded",
        LO,
        "return found if isinstance(found, int) and not isinstance(found, bool) else None",
        "return None",
    ),
    # diagnostics.py: everything restored
    Mutation("diagnostics.python-rng-not-restored", D, "random.setstate(py_rng)", "pass"),
    Mutation("diagnostics.numpy-rng-not-restored", D, "np.random.set_state(np_rng)", "pass"),
    Mutation("diagnostics.grad-values-not-restored", D, "g.copy_(saved_grad)", "pass"),
    Mutation("diagnostics.grad-not-reattached", D, "p.grad = g\n", "pass\n"),
    Mutation("diagnostics.reassigned-buffer-not-restored", D, "m._buffers[name] = b", "pass"),
    Mutation(
        "diagnostics.cosine-of-zero-is-0",
        D,
        "if na == 0.0 or nb == 0.0:\n        return math.nan",
        "if na == 0.0 or nb == 0.0:\n        return 0.0",
    ),
    Mutation(
        "diagnostics.total-is-main",
        D,
        'total = sum(flats.values(), torch.zeros_like(flats["main"]))',
        'total = flats["main"]',
    ),
    Mutation(
        "diagnostics.frozen-modules-listed",
        D,
        "if any(p.requires_grad for p in m.parameters(recurse=False))",
        "if any(True for p in m.parameters(recurse=False))",
    ),
    Mutation(
        "diagnostics.least-decayed-first",
        D,
        "key=lambda s: (math.isnan(s[0]), s[0], s[1])",
        "key=lambda s: (math.isnan(s[0]), -s[0], s[1])",
    ),
    # multiscale.py
    Mutation("multiscale.nnunet-coarsest-kept", MS, "levels[-1] = 0.0", "pass"),
    Mutation(
        "multiscale.monai-exp-no-floor",
        MS,
        "return max(0.5**level, 0.0625)",
        "return 0.5**level",
    ),
    Mutation(
        "multiscale.ignore-index-dropped",
        MS,
        "ignore_index=ignore_index,\n    )",
        "ignore_index=None,\n    )",
    ),
    Mutation(
        "multiscale.levels-start-at-half",
        MS,
        "for level in range(len(names) + 1)]",
        "for level in range(1, len(names) + 2)]",
    ),
    # heads.py
    Mutation(
        "heads.seg-nhwc-not-permuted",
        H,
        'if self.layout == "NHWC":\n            x = x.permute(0, 3, 1, 2)',
        "if False:\n            x = x.permute(0, 3, 1, 2)",
    ),
    Mutation(
        "heads.classification-nhwc-pools-channels",
        H,
        'tuple(range(1, x.dim() - 1)) if self.layout == "NHWC" else tuple(range(2, x.dim()))',
        "tuple(range(2, x.dim()))",
    ),
    Mutation(
        "heads.token-cls-takes-last",
        H,
        'x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)',
        'x = x[:, -1] if self.pool == "cls" else x.mean(dim=1)',
    ),
    # issue 18
    Mutation(
        "routing.keep-leaving-rows",
        "deepsup/_routing.py",
        "return order[:stay], order[stay:], n",
        "return order[stay:], order[:stay], n",
    ),
    Mutation(
        "routing.rows-not-updated",
        "deepsup/_routing.py",
        "self.rows = rows[keep]",
        "self.rows = rows[: keep.numel()]",
    ),
    Mutation(
        "routing.check-tolerates-any-difference",
        "deepsup/_routing.py",
        "rtol=1e-4,",
        "rtol=1e4,",
    ),
    Mutation(
        "exits.route-ignores-threshold",
        "deepsup/exits.py",
        "return self.early._confidence(self.name, pred) >= threshold",
        "return self.early._confidence(self.name, pred) > threshold",
    ),
    Mutation(
        "exits.patience-state-not-subset",
        "deepsup/exits.py",
        "call.streak, call.last = call.streak[routing.kept], call.last[routing.kept]",
        "call.streak, call.last = call.streak, call.last",
    ),
    Mutation(
        "exits.temperature-ignored",
        "deepsup/exits.py",
        "            pred = pred / t\n",
        "            pred = pred\n",
    ),
    Mutation(
        "functional.patience-no-restart",
        "deepsup/functional.py",
        "return torch.where(same, streak + 1, torch.ones_like(streak))",
        "return torch.where(same, streak + 1, streak)",
    ),
    Mutation(
        "functional.ece-signed-gap",
        "deepsup/functional.py",
        "return gap.abs().sum() / conf.numel()",
        "return gap.sum().abs() / conf.numel()",
    ),
    Mutation(
        "calibration.budget-ignored",
        "deepsup/_calibration.py",
        "if cost <= limit + 1e-9 and (gain or cheaper):",
        "if gain or cheaper:",
    ),
    Mutation(
        "export.cut-at-first-call-always",
        "deepsup/_export.py",
        'nodes[name] = calls[-1] if rule == "last" else calls[0]',
        "nodes[name] = calls[0]",
    ),
    # issue 17
    Mutation(
        "build.reuse-head-copied",
        "deepsup/_build.py",
        "copied = uses[id(spec)] > 1 and not isinstance(spec, Reuse)",
        "copied = uses[id(spec)] > 1",
    ),
    Mutation(
        "build.reuse-foreign-module-accepted",
        "deepsup/_build.py",
        "        if id(m) not in own:",
        "        if False:",
    ),
    Mutation(
        "wrapper.zero-weight-reuse-head-runs",
        W,
        "if name in self._off and s.criterion is not None:",
        "if False:",
    ),
    Mutation(
        "wrapper.zero-weight-skips-own-parameters",
        W,
        "if w == 0) & self._paramless",
        "if w == 0)",
    ),
    Mutation(
        "losses.next-token-no-shift",
        "deepsup/losses.py",
        "labels = causal_labels(target, ignore_index=self.ignore_index).reshape(-1)",
        "labels = target.reshape(-1)",
    ),
    Mutation(
        "functional.causal-labels-mask-ignored",
        "deepsup/functional.py",
        "labels = labels.masked_fill(attention_mask == 0, ignore_index)",
        "pass",
    ),
    Mutation("schedules.sum-l-is-l", S, "depth * (depth + 1) / 2", "float(depth)"),
    Mutation(
        "schedules.rotational-ignores-every",
        S,
        "(step // self.every) % self.count == self.index",
        "step % self.count == self.index",
    ),
    Mutation(
        "schedules.gradual-shallow-first",
        S,
        "self.fraction * (self.count - self.index) / self.count",
        "self.fraction * (self.index + 1) / self.count",
    ),
    Mutation(
        "speculative.accepts-after-a-mismatch",
        "deepsup/speculative.py",
        "n = int(matches.cumprod(0).sum())",
        "n = int(matches.sum())",
    ),
    Mutation(
        "layerdrop.eval-not-spared",
        "deepsup/layerdrop.py",
        "if not module.training or self.p == 0.0:",
        "if self.p == 0.0:",
    ),
    Mutation(
        "layerdrop.whole-batch-skipped",
        "deepsup/layerdrop.py",
        "keep = torch.rand(x.shape[0], device=x.device) >= self.p",
        "keep = torch.rand((), device=x.device).expand(x.shape[0]) >= self.p",
    ),
    Mutation(
        "speculative.cache-not-cut-before-verify",
        "deepsup/speculative.py",
        "cut_cache(cache, done)  # the drafted entries of the shared layers",
        "pass",
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
            path = ROOT / m.file
            ok = path.exists() and _apply(path.read_text(), m) is not None
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
