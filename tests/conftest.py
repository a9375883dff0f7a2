"""Shared fixtures: small models of the kinds deepsup must handle."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

# Hypothesis: deterministic in CI (the same examples on every run, no example database), a wider
# random search locally. Pick one with HYPOTHESIS_PROFILE=ci|dev; CI=true selects "ci".
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", max_examples=200)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")
)


class TinyCNN(nn.Module):
    """stem -> stage1 -> stage2 -> classifier conv; a segmentation-style model (B, K, H, W)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.act1 = nn.ReLU()
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(32, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.cls(self.stage2(self.act1(self.stage1(self.stem(x)))))
        return nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ConvNet(nn.Module):
    """A small segmentation-style CNN: (B, 3, H, W) -> (B, num_classes, H, W), no in-place ops."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.stage2 = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1))
        self.cls = nn.Conv2d(32, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cls(self.stage2(self.stage1(self.stem(x))))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(12, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(self.act(self.fc1(x)))))


class Tokens(nn.Module):
    """(B, N, 5) -> embed (B, N, 8) -> per-token logits (B, N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x)))


class TupleBlock(nn.Module):
    """Returns (hidden, attention-like) as transformer layers do."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(x)
        return h, h.softmax(-1)


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.block = TupleBlock(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.block(self.embed(x))
        return self.head(h.mean(1))


class ReuseModel(nn.Module):
    """Applies ``shared`` twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.relu(self.shared(self.inp(x)))))


class TrainOnlyBranch(nn.Module):
    """``extra`` runs only in training (like a model's own aux branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.extra = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.training:
            h = h + 0 * self.extra(h)
        return self.out(h)


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: share the cores between the workers instead of oversubscribing them
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return TinyCNN()


@pytest.fixture
def mlp() -> MLP:
    return MLP()


@pytest.fixture
def tuple_model() -> TupleModel:
    return TupleModel()


@pytest.fixture
def reuse_model() -> ReuseModel:
    return ReuseModel()


@pytest.fixture
def train_only_model() -> TrainOnlyBranch:
    return TrainOnlyBranch()


ROOT = Path(__file__).resolve().parents[1]
TREE_DEEPSUP = ROOT / "deepsup" / "__init__.py"


def tree_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must import this tree's deepsup, not an install."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def assert_imports_tree(env: dict[str, str]) -> None:
    """A subprocess started with ``env`` imports deepsup from the tree under test."""
    done = subprocess.run(
        [sys.executable, "-c", "import deepsup; print(deepsup.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # not the repository root, which would be on sys.path anyway
        timeout=120,
        check=True,
    )
    assert Path(done.stdout.strip()).resolve() == TREE_DEEPSUP


def bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy made before wrapping: the reference for bit-identical checks."""
    return copy.deepcopy(model)
