"""DistributedDataParallel and FSDP2 under torchrun (2 CPU processes, gloo), and SyncBatchNorm.

One torchrun launch runs every scenario of ``tests/_dist_worker.py`` (starting processes costs
more than the scenarios); each test below checks one scenario's measurements. The worker compares
each run with a single-process reference that averages every rank's gradient itself.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import TREE_DEEPSUP, tree_env
from filelock import FileLock
from torch import nn

import deepsup
from deepsup import DeepSupervision, heads

WORKER = Path(__file__).with_name("_dist_worker.py")


def _launch(out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = tree_env()  # the ranks must import this tree's deepsup (checked below)
    proc = subprocess.run(
        [*cmd, str(WORKER), str(out)], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The worker's results; under pytest-xdist the first worker launches, the others read."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp("dist") / "results.json"
        _launch(out)
    else:
        shared = tmp_path_factory.getbasetemp().parent
        out = shared / "deepsup_dist_results.json"
        with FileLock(str(out) + ".lock"):
            if not out.exists():
                _launch(out)
    found: dict[str, Any] = json.loads(out.read_text())
    return found


@pytest.mark.distributed
def test_the_ranks_import_the_tree_under_test(results: dict[str, Any]) -> None:
    assert [Path(f).resolve() for f in results["deepsup_files"]] == [TREE_DEEPSUP] * 2


def scenario(results: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = results[name]
    assert found["ok"], f"{name} failed on a rank: {found['error']}\n{found['traceback']}"
    return found


@pytest.mark.distributed
def test_ddp_around_the_wrapper_keeps_model_and_heads_identical(results: dict[str, Any]) -> None:
    r = scenario(results, "ddp_wrapper")
    assert r["head_params"] > 0
    assert r["min_head_change"] > 0  # the heads trained
    assert r["max_diff_across_ranks"] == 0.0
    assert r["max_diff_to_reference"] < 1e-5


@pytest.mark.distributed
def test_ddp_weight_cut_to_zero_needs_no_find_unused_parameters(results: dict[str, Any]) -> None:
    r = scenario(results, "ddp_cutoff")
    assert r["weights"] == [0.4, 0.0, 0.0, 0.0]
    # the head still runs and its loss is multiplied by 0: a zero gradient, not a missing one
    assert r["head_grad_norms"][0] > 0
    assert r["head_grad_norms"][1:] == [0.0, 0.0, 0.0]
    assert r["max_diff_across_ranks"] == 0.0
    assert r["max_diff_to_reference"] < 1e-5


@pytest.mark.distributed
def test_ddp_around_an_llm_with_rotating_exits_and_a_shared_head(results: dict[str, Any]) -> None:
    r = scenario(results, "ddp_llm_rotational")
    assert r["active"] == [["model.layers.0"], ["model.layers.1"], ["model.layers.2"]]
    assert r["params"] == r["model_params"]  # heads.reuse: no parameters of its own
    assert r["lm_head_change"] > 0  # trained
    assert r["max_diff_across_ranks"] == 0.0
    assert r["max_diff_to_reference"] < 1e-5


@pytest.mark.distributed
def test_fsdp2_fully_shard_blocks_and_wrapper(results: dict[str, Any]) -> None:
    r = scenario(results, "fsdp2")
    assert r["sharded_params"] == r["params"]  # heads included
    assert r["max_diff_to_reference"] < 1e-5
    repeat = r["repeat_losses"]
    assert all(b < a for a, b in itertools.pairwise(repeat))


# SyncBatchNorm: converting replaces BatchNorm modules. On CPU a SyncBatchNorm only runs (as a
# plain BatchNorm) without an initialized process group, which is enough to see which hooks
# survive the conversion.


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 4, 1),
    )


def _sup(model: nn.Module, tap: str) -> DeepSupervision:
    return DeepSupervision(
        model, {tap: 0.4}, head=heads.seg(num_classes=4), criterion=nn.CrossEntropyLoss()
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 4, (2, 8, 8), generator=g)


def _sync_bn_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs no process group")
def test_sync_batchnorm_conversion_of_the_wrapper_keeps_non_batchnorm_taps() -> None:
    sup = _sup(_bn_net(), "3")  # a block that contains a BatchNorm
    assert nn.SyncBatchNorm.convert_sync_batchnorm(sup) is sup
    assert _sync_bn_count(sup.model) == 2
    assert _sync_bn_count(sup.heads) == 1  # the heads' BatchNorm too
    x, y = _data()
    _, aux = sup.train()(x, target=y)
    assert list(aux) == ["3"]


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs no process group")
def test_sync_batchnorm_conversion_drops_the_hook_of_a_batchnorm_tap() -> None:
    sup = _sup(_bn_net(), "1")  # the tap is a BatchNorm2d: conversion replaces it
    nn.SyncBatchNorm.convert_sync_batchnorm(sup)
    x, y = _data()
    with pytest.raises(deepsup.errors.CaptureError, match="tap '1' did not run"):
        sup.train()(x, target=y)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs no process group")
def test_sync_batchnorm_convert_model_first_then_heads_for_batchnorm_taps() -> None:
    sup = _sup(nn.SyncBatchNorm.convert_sync_batchnorm(_bn_net()), "1")
    nn.SyncBatchNorm.convert_sync_batchnorm(sup.heads)
    assert _sync_bn_count(sup) == 3
    x, y = _data()
    _, aux = sup.train()(x, target=y)
    assert list(aux) == ["1"]
