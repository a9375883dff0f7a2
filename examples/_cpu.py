"""CPU threads and run times for the examples: never more threads than the free CPUs.

More torch threads than free cores make every parallel op wait for a thread that is not
running: on the project's shared 2-core machine at load average 2, ``examples/minimal.py``
took 23 s with two threads and 8 s with one. The examples call :func:`set_threads` once at
start; ``--threads N`` (or ``OMP_NUM_THREADS``) overrides the default.
"""

from __future__ import annotations

import os

import torch


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average; None where the OS has none (Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def free_cpus() -> int:
    """The usable CPUs less the 1-minute load average (rounded), at least 1.

    The load average counts the processes running or waiting to run, so ``cpus - load`` is
    what other work leaves free. Without a load average every usable CPU counts as free.
    """
    cpus = usable_cpus()
    return max(1, min(cpus, round(cpus - (load_average() or 0.0))))


def set_threads(threads: int | None) -> str:
    """Set torch's threads and return one line saying how many and why.

    ``threads`` is ``--threads``; ``None`` keeps ``OMP_NUM_THREADS`` where it is set (torch
    read it at import), else takes :func:`free_cpus`, shared among the processes that
    ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``).
    """
    if threads is not None:
        reason = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        reason = "OMP_NUM_THREADS"
    else:
        free = free_cpus()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, free // local)
        load = load_average()
        shown = "unknown" if load is None else f"{load:.1f}"
        reason = f"{free} of {usable_cpus()} CPUs free at load average {shown}"
        if local > 1:
            reason += f", shared by {local} processes"
        reason += "; --threads N to change"
    torch.set_num_threads(threads)
    return f"torch threads: {threads} ({reason})"


def about(seconds: float) -> str:
    """A run time as the start-up lines give it: seconds below 90 s, else minutes."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
