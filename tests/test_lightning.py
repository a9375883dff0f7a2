"""The PyTorch Lightning recipe of docs/recipes.md, as written, trains and validates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepsup

L = pytest.importorskip("lightning")

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def recipe() -> dict[str, Any]:
    """Run the recipe's code block; return its namespace (``LitSegmentation``)."""
    blocks = re.findall(r"```python\n(.*?)```", RECIPES.read_text(), re.S)
    code = next(b for b in blocks if "class LitSegmentation" in b)
    namespace: dict[str, Any] = {}
    exec(compile(code, "recipes.md[lightning]", "exec"), namespace)
    return namespace


class Net(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.layer3 = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.cls = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.cls(self.layer3(x)), size=x.shape[-2:], mode="bilinear")


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8, 16, 16), generator=g)
    )
    return DataLoader(data, batch_size=4)


def trainer(root: Path) -> Any:
    return L.Trainer(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def test_lightning_recipe_trains_validates_and_checkpoints(tmp_path: Path) -> None:
    lit_cls = recipe()["LitSegmentation"]
    lit = lit_cls(Net(), num_classes=4)
    head_before = [p.detach().clone() for p in lit.sup.heads["layer3"].parameters()]
    fit = trainer(tmp_path)
    fit.fit(lit, loader(), loader())

    assert lit.sup.progress == 2  # sup.step() once per training step
    assert {"train/main", "train/aux/layer3", "val/loss"} <= set(fit.callback_metrics)
    head_after = list(lit.sup.heads["layer3"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head_after, strict=True))

    lit.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(lit(x), lit.sup.model(x), rtol=0, atol=0)

    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)
    restored = lit_cls.load_from_checkpoint(path, model=Net(), num_classes=4)
    assert restored.sup.progress == 2
    plain = Net()
    plain.load_state_dict(deepsup.model_state_dict(restored.sup.state_dict()))
    plain.eval()
    torch.testing.assert_close(plain(x), lit(x))
