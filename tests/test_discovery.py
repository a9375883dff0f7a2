"""list_taps and the command line."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import pytest
import timm
import torch
import torchvision
from conftest import ReuseModel, TinyCNN, tree_env

from deepsup import list_taps
from deepsup.__main__ import build_model, main
from deepsup.diagnostics import format_taps


def test_list_taps_without_input_lists_names_and_types(tiny_cnn: TinyCNN) -> None:
    infos = list_taps(tiny_cnn)
    names = [t.name for t in infos]
    assert names == [n for n, _ in tiny_cnn.named_modules() if n]
    assert infos[0].type == "Sequential" and infos[0].shape is None and infos[0].calls is None


def test_list_taps_with_input_reports_shapes_and_calls(reuse_model: ReuseModel) -> None:
    training = reuse_model.training
    infos = {t.name: t for t in list_taps(reuse_model, torch.randn(2, 4))}
    assert infos["shared"].calls == 2
    assert infos["inp"].calls == 1
    assert infos["out"].shape == (2, 2)
    assert infos["out"].output == "Tensor"
    assert reuse_model.training == training


def test_stage_boundaries_are_suggested() -> None:
    resnet = torchvision.models.resnet18()
    suggested = {t.name for t in list_taps(resnet) if t.suggested}
    assert {"layer1", "layer2", "layer3", "layer4"} <= suggested
    assert "layer3.0.conv1" not in suggested
    convnext = timm.create_model("convnext_atto")
    assert {"stages.1", "stages.2"} <= {t.name for t in list_taps(convnext) if t.suggested}


def test_modules_that_do_not_run_show_zero_calls(train_only_model: torch.nn.Module) -> None:
    infos = {t.name: t for t in list_taps(train_only_model, torch.randn(2, 4))}
    assert infos["extra"].calls == 0  # list_taps runs in eval mode


def test_format_taps_marks_suggestions() -> None:
    resnet = torchvision.models.resnet18()
    infos = list_taps(resnet, torch.randn(1, 3, 32, 32))
    lines = format_taps(infos).splitlines()
    assert lines[0].split() == ["name", "type", "output", "shape", "calls"]
    rows = {line.split()[1 if line.startswith("*") else 0]: line for line in lines[1:]}
    assert len(rows) == len(infos)
    for info in infos:
        assert rows[info.name].startswith("*") == info.suggested, info.name
    assert re.match(r"^\*\s+layer3\s+Sequential\s+Tensor\s+\(1, 256, 2, 2\)\s+1$", rows["layer3"])
    assert re.match(
        r"^\s+layer3\.0\.conv1\s+Conv2d\s+Tensor\s+\(1, 256, 2, 2\)\s+1$", rows["layer3.0.conv1"]
    )


def test_cli_lists_a_torchvision_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "torchvision:resnet18", "--input", "1,3,32,32", "--suggested"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\*\s+layer3\s+Sequential\s+Tensor\s+\(1, 256, 2, 2\)\s+1$", out, re.M)
    assert "downsample" not in out
    assert "modules; * marks suggested taps" in out


def test_cli_builds_timm_and_callables() -> None:
    assert type(build_model("timm:resnet18")).__name__ == "ResNet"
    assert type(build_model("conftest:TinyCNN")).__name__ == "TinyCNN"
    with pytest.raises(ValueError, match=r"model 'resnet18' must be 'timm:NAME'"):
        build_model("resnet18")


def test_cli_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deepsup", "list", "torchvision:mobilenet_v3_small", "--suggested"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=tree_env(),
        cwd=tempfile.gettempdir(),  # imports deepsup through tree_env's PYTHONPATH only
    )
    assert result.returncode == 0, result.stderr
    assert "features.6" in result.stdout
