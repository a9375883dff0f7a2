"""The code in README.md, docs/*.md and the public contract (API.md) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "design" / "API.md"
FENCE = re.compile(r"```python\n(.*?)```", re.S)


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer1(x))


class _SegNet(nn.Module):
    """Stands in for the contract's `model`: a backbone with `layer3` and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.cls = nn.Conv2d(32, 21, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cls(torch.relu(self.backbone(x)))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")


def _contract_namespace() -> dict[str, object]:
    return {
        "torch": torch,
        "model": _SegNet(),
        "images": torch.randn(2, 3, 32, 32),
        "labels": torch.randint(0, 21, (2, 32, 32)),
        "criterion": nn.CrossEntropyLoss(ignore_index=255),
    }


def _blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


def _needs_contract_names(code: str) -> bool:
    return "model," in code and "import" in code and "model =" not in code


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CASES = [
    pytest.param(path, i, code, id=f"{path.name}-{i}")
    for path in DOCS
    for i, code in enumerate(_blocks(path))
    if "# not run" not in code
]


@pytest.mark.parametrize(("path", "index", "code"), CASES)
def test_doc_code_blocks_run(path: Path, index: int, code: str, tmp_path: Path) -> None:
    namespace = _contract_namespace() if _needs_contract_names(code) else {}
    code = code.replace("/tmp/", f"{tmp_path}/")
    exec(compile(code, f"{path.name}[{index}]", "exec"), namespace)


def test_every_python_block_is_collected_and_checks_its_result() -> None:
    """No block slips past the fence regex, and each run block asserts what it shows."""
    for path in DOCS:
        assert path.read_text().count("```python") == len(_blocks(path)), path.name
    silent = [
        case.id
        for case in CASES
        if not re.search(r"^\s*(assert |raise AssertionError)", case.values[2], re.M)
    ]
    assert silent == [], f"doc blocks that assert nothing: {silent}"
    assert {case.values[0].name for case in CASES} >= {"README.md", "index.md", "recipes.md"}


@pytest.mark.skipif(not CONTRACT.exists(), reason="../shared/design/API.md is not beside the repo")
def test_the_contract_example_runs_as_written() -> None:
    blocks = _blocks(CONTRACT)
    assert blocks, "API.md has no python block"
    namespace = _contract_namespace()
    exec(compile(blocks[0], "API.md", "exec"), namespace)
    sup, model, images = namespace["sup"], namespace["model"], namespace["images"]
    assert torch.equal(sup(images), model(images))  # type: ignore[operator]
