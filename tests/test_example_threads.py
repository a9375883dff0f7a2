"""The examples' thread default never oversubscribes the cores; the flagship's start-up estimate
scales with the run (each example's test checks that it prints its estimate first)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _shared  # noqa: E402
import pspnet_voc  # noqa: E402


@pytest.fixture
def restore_threads() -> object:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cpus", "load", "free"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 8.0, 1), (16, 3.2, 13), (4, None, 4)],
    ids=["idle", "light", "one-busy", "mostly-busy", "overloaded", "big-machine", "no-loadavg"],
)
def test_free_cpus_leaves_the_busy_cores_alone(
    monkeypatch: pytest.MonkeyPatch, cpus: int, load: float | None, free: int
) -> None:
    monkeypatch.setattr(_shared, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(_shared, "load_average", lambda: load)
    assert _shared.free_cpus() == free


def test_usable_cpus_is_this_process_affinity() -> None:
    if hasattr(os, "sched_getaffinity"):
        assert _shared.usable_cpus() == len(os.sched_getaffinity(0))
    assert 1 <= _shared.usable_cpus() <= (os.cpu_count() or 1)


@pytest.mark.usefixtures("restore_threads")
def test_set_threads_takes_the_free_cpus_shared_by_torchrun_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_shared, "usable_cpus", lambda: 8)
    monkeypatch.setattr(_shared, "load_average", lambda: 1.7)
    line = _shared.set_threads(None)
    assert torch.get_num_threads() == 6
    assert line == "torch threads: 6 (6 of 8 CPUs free at load average 1.7; --threads N to change)"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _shared.set_threads(None).startswith("torch threads: 1 (6 of 8 CPUs free")
    assert torch.get_num_threads() == 1  # 6 free cores among 4 processes: 1 each, never 2


@pytest.mark.usefixtures("restore_threads")
def test_set_threads_keeps_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shared, "load_average", lambda: 50.0)
    assert _shared.set_threads(2) == "torch threads: 2 (--threads)"
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _shared.set_threads(None) == "torch threads: 2 (OMP_NUM_THREADS)"


def test_the_pspnet_estimate_scales_with_the_run_and_the_threads() -> None:
    defaults = pspnet_voc.parse_args(["--device", "cpu"])
    one, two = (pspnet_voc.expected_duration(defaults, t, world=1) for t in (1, 2))
    assert one.startswith("expected: about 7 min on 1 thread(s)")  # 2,400 images at 6.5/s
    assert two.startswith("expected: about 4 min on 2 thread(s)")  # the documented 4 min
    assert one.endswith("a quick check: --epochs 1 --steps-per-epoch 5 --val-images 10")
    quick = pspnet_voc.parse_args(["--device", "cpu", *pspnet_voc.QUICK_RUN.split()])
    assert pspnet_voc.expected_duration(quick, 1, world=1).startswith("expected: about 7 s ")
    real = pspnet_voc.parse_args(["--device", "cpu", "--data-root", str(ROOT)])
    assert "not measured for this configuration" in pspnet_voc.expected_duration(real, 2, 1)
    assert "not measured" in pspnet_voc.expected_duration(defaults, 2, world=2)
