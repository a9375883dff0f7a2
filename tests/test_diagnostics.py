"""deepsup.diagnostics: gradient_flow (exact, side-effect free) and suggest_taps."""

from __future__ import annotations

import math
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deepsup import DeepSupError, DeepSupervision, Tap, heads
from deepsup.diagnostics import GradientFlow, TapSuggestion, gradient_flow, suggest_taps


def half_sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((pred - target) ** 2).sum()


def deep_plain(depth: int = 12, width: int = 6) -> nn.Sequential:
    """Conv + tanh blocks with two max-pools, small init: the gradient decays toward the input."""
    layers: list[nn.Module] = []
    for i in range(depth):
        block: list[nn.Module] = [nn.Conv2d(1 if i == 0 else width, width, 3, padding=1), nn.Tanh()]
        if i in (depth // 3, 2 * depth // 3):
            block.append(nn.MaxPool2d(2))
        layers.append(nn.Sequential(*block))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5)]
    return nn.Sequential(*layers)


def bn_net(in_channels: int, classes: int) -> nn.Sequential:
    """Conv, BatchNorm, ReLU, Dropout and pooling: state that a diagnostic must leave alone."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )  # fmt: skip


# --------------------------------------------------------------------------- exactness


def test_gradient_flow_matches_a_hand_computation() -> None:
    """Two bias-free linear layers, a linear aux head on the first, half squared error:
    every gradient has a closed form."""
    torch.manual_seed(0)
    w1 = torch.randn(3, 2, dtype=torch.float64)
    w2 = torch.randn(1, 3, dtype=torch.float64)
    h = torch.randn(1, 3, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False)).double()
    head = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[1].weight.copy_(w2)
        head.weight.copy_(h)
    weight = 0.25  # exact in float32, the dtype the wrapper keeps weights in
    sup = DeepSupervision(model, {"0": Tap(weight=weight, head=head)}, criterion=half_sse)

    report = gradient_flow(sup, x, target=y, criterion=half_sse)

    hidden = x @ w1.T  # (4, 3)
    err_main = hidden @ w2.T - y  # (4, 1)
    err_aux = hidden @ h.T - y
    g_main_w1 = (err_main @ w2).T @ x  # dL/dW1 = sum_n W2^T e_n x_n^T
    g_main_w2 = err_main.T @ hidden
    g_aux_w1 = weight * (err_aux @ h).T @ x
    cos = float((g_main_w1 * g_aux_w1).sum() / (g_main_w1.norm() * g_aux_w1.norm()))

    rows = report.to_rows()
    assert [r["module"] for r in rows] == ["0", "1"]
    assert [r["depth"] for r in rows] == [0, 1]
    assert [r["params"] for r in rows] == [6, 3]
    assert rows[0]["main"] == pytest.approx(float(g_main_w1.norm()), rel=1e-12)
    assert rows[1]["main"] == pytest.approx(float(g_main_w2.norm()), rel=1e-12)
    assert rows[0]["aux"]["0"] == pytest.approx(float(g_aux_w1.norm()), rel=1e-12)
    assert rows[1]["aux"]["0"] == 0.0  # the aux loss never reaches the layer after the tap
    assert rows[0]["cosine"]["0"] == pytest.approx(cos, rel=1e-12)
    assert math.isnan(rows[1]["cosine"]["0"])
    assert rows[0]["total"] == pytest.approx(float((g_main_w1 + g_aux_w1).norm()), rel=1e-12)
    assert report.losses["main"] == pytest.approx(float(0.5 * (err_main**2).sum()), rel=1e-12)
    assert report.losses["0"] == pytest.approx(float(weight * 0.5 * (err_aux**2).sum()), rel=1e-12)
    assert report.tap_depths == {"0": 0}


def test_gradient_flow_equals_separate_backward_passes() -> None:
    """On a conv net with BatchNorm: each column equals the norm of the .grad that a separate
    backward of that loss alone leaves (same forward, same batch statistics)."""
    torch.manual_seed(1)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    taps = [n for n, m in cnn.named_modules() if isinstance(m, nn.Conv2d)][:2]
    sup = DeepSupervision(
        cnn,
        dict.fromkeys(taps, 0.7),
        head=heads.classification(10),
        criterion=nn.CrossEntropyLoss(),
    )
    ce = nn.CrossEntropyLoss()
    report = gradient_flow(sup, x, target=y, criterion=ce)

    reference = {}
    for which in ["main", *taps]:
        sup.zero_grad(set_to_none=True)
        output, aux = sup(x, target=y)
        (ce(output, y) if which == "main" else aux[which]).backward()
        reference[which] = {
            name: math.sqrt(
                sum(
                    float(p.grad.norm()) ** 2
                    for p in m.parameters(recurse=False)
                    if p.grad is not None
                )
            )
            for name, m in cnn.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        }
    for row in report.rows:
        assert row["main"] == pytest.approx(reference["main"][row["module"]], rel=1e-5, abs=1e-9)
        for tap in taps:
            assert row["aux"][tap] == pytest.approx(
                reference[tap][row["module"]], rel=1e-5, abs=1e-9
            )


def test_cosine_is_minus_one_when_the_aux_loss_opposes_the_main_loss() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2))
    ce = nn.CrossEntropyLoss()

    def against(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -ce(pred, target)

    sup = DeepSupervision(model, {"0": Tap(weight=0.5, head=nn.Identity(), criterion=against)})
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    (row,) = gradient_flow(sup, x, target=y, criterion=ce).rows
    assert row["cosine"]["0"] == pytest.approx(-1.0, abs=1e-6)
    assert row["aux"]["0"] == pytest.approx(0.5 * row["main"], rel=1e-6)
    assert row["total"] == pytest.approx(0.5 * row["main"], rel=1e-5)


def test_rows_follow_execution_order_not_definition_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 2)
            self.early = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.late(torch.tanh(self.early(x)))
            return out

    sup = DeepSupervision(
        Reversed(), {"early": 0.4}, head=heads.classification(2), criterion=nn.CrossEntropyLoss()
    )
    report = gradient_flow(
        sup, torch.randn(3, 3), target=torch.tensor([0, 1, 0]), criterion=nn.CrossEntropyLoss()
    )
    assert [(r["module"], r["depth"]) for r in report.rows] == [("early", 0), ("late", 1)]
    assert report.tap_depths == {"early": 0}
    assert report.rows[0]["aux"]["early"] > 0
    assert report.rows[1]["aux"]["early"] == 0


def test_frozen_parameters_are_left_out() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    sup = DeepSupervision(model, {"2": 0.4}, head=nn.Identity(), criterion=nn.CrossEntropyLoss())
    report = gradient_flow(
        sup, torch.randn(3, 3), target=torch.tensor([0, 1, 1]), criterion=nn.CrossEntropyLoss()
    )
    assert [r["module"] for r in report.rows] == ["2"]


# --------------------------------------------------------------------------- side effects


def snapshot(sup: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in sup.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in sup.named_parameters()},
        "buffers": {n: b.clone() for n, b in sup.named_buffers()},
        "modes": {n: m.training for n, m in sup.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modes"] == before["modes"]
    assert torch.equal(after["rng"], before["rng"])
    for kind in ("params", "buffers", "grads"):
        assert before[kind].keys() == after[kind].keys()
        for name, value in before[kind].items():
            if value is None:
                assert after[kind][name] is None, name
            else:
                assert torch.equal(after[kind][name], value), (kind, name)


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_gradient_flow_has_no_side_effects(mode: str) -> None:
    torch.manual_seed(3)
    model = bn_net(3, 4)
    sup = DeepSupervision(
        model,
        {"1": 0.4},
        head=heads.classification(4, dropout=0.3),
        criterion=nn.CrossEntropyLoss(),
    )
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    # some state to keep: running stats moved away from their init, grads on half the params
    sup.train()
    out, aux = sup(x, target=y)
    (nn.functional.cross_entropy(out, y) + sum(aux.values())).backward()
    for p in list(sup.parameters())[::2]:
        p.grad = None
    if mode == "eval":
        sup.eval()
    elif mode == "mixed":
        sup.eval()
        model[1].train()
        sup.heads.train()
    sup.step(3)
    grad_objects = [p.grad for p in sup.parameters()]
    before = snapshot(sup)
    progress = sup.progress

    gradient_flow(sup, x, target=y, criterion=nn.CrossEntropyLoss())

    assert_same(before, snapshot(sup))
    assert all(p.grad is g for p, g in zip(sup.parameters(), grad_objects, strict=True))
    assert sup.progress == progress
    assert torch.rand(3).tolist() == (torch.set_rng_state(before["rng"]) or torch.rand(3).tolist())


class _PythonAndNumpyNoise(nn.Module):
    """A model whose forward draws from Python's and NumPy's RNGs (stochastic depth, jitter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return self.b(torch.tanh(self.a(x)) * scale)


def test_gradient_flow_restores_pythons_and_numpys_rng_states() -> None:
    sup = DeepSupervision(
        _PythonAndNumpyNoise(), {"a": 0.4}, head=heads.classification(2),
        criterion=nn.CrossEntropyLoss(),
    )  # fmt: skip
    random.seed(5)
    np.random.seed(5)
    py_state, np_state = random.getstate(), np.random.get_state()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    gradient_flow(sup, x, target=y, criterion=nn.CrossEntropyLoss())
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


def test_gradient_flow_restores_grads_that_a_criterion_accumulates() -> None:
    """A criterion that runs its own backward (a training framework's loss wrapper) writes into
    ``.grad``; the existing grads come back with their values, absent ones stay absent."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sup = DeepSupervision(
        model, {"1": 0.4}, head=heads.classification(2), criterion=nn.CrossEntropyLoss()
    )
    model[0].weight.grad = torch.ones_like(model[0].weight)
    grad = model[0].weight.grad

    def backward_inside(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out, y)
        loss.backward(retain_graph=True)
        return loss

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    gradient_flow(sup, x, target=y, criterion=backward_inside)
    assert model[0].weight.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert all(p.grad is None for p in sup.parameters() if p is not model[0].weight)


def test_gradient_flow_restores_state_when_the_criterion_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sup = DeepSupervision(
        model, {"0": 0.4}, head=heads.classification(2), criterion=nn.CrossEntropyLoss()
    ).eval()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    before = snapshot(sup)

    def broken(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gradient_flow(sup, x, target=y, criterion=broken)
    assert_same(before, snapshot(sup))


# --------------------------------------------------------------------------- errors and output


def test_gradient_flow_needs_a_wrapper() -> None:
    with pytest.raises(DeepSupError, match=r"needs a DeepSupervision wrapper .got Sequential"):
        gradient_flow(
            nn.Sequential(nn.Linear(2, 2)), torch.randn(2, 2), target=None, criterion=nn.MSELoss()
        )


def test_gradient_flow_needs_losses_not_predictions() -> None:
    sup = DeepSupervision(
        nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)),
        {"0": 0.4},
        head=heads.classification(2),
        criterion=None,
    )
    with pytest.raises(ValueError, match="tap '0' has no criterion, so it returns a prediction"):
        gradient_flow(
            sup,
            torch.randn(4, 2),
            target=torch.tensor([0, 1, 0, 1]),
            criterion=nn.CrossEntropyLoss(),
        )


def test_main_loss_must_be_a_scalar() -> None:
    sup = DeepSupervision(
        nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)),
        {"0": 0.4},
        head=heads.classification(2),
        criterion=nn.CrossEntropyLoss(),
    )
    with pytest.raises(DeepSupError, match=r"scalar tensor .got Tensor of shape \(4,\)"):
        gradient_flow(
            sup,
            torch.randn(4, 2),
            target=torch.tensor([0, 1, 0, 1]),
            criterion=nn.CrossEntropyLoss(reduction="none"),
        )


@pytest.fixture
def report() -> GradientFlow:
    torch.manual_seed(4)
    model = deep_plain(depth=6)
    sup = DeepSupervision(
        model, {"1": 0.4, "3": 0.4}, head=heads.classification(5), criterion=nn.CrossEntropyLoss()
    )
    return gradient_flow(
        sup,
        torch.randn(4, 1, 12, 12),
        target=torch.tensor([0, 1, 2, 3]),
        criterion=nn.CrossEntropyLoss(),
    )


def test_str_is_a_table_with_every_module_and_tap(report: GradientFlow) -> None:
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == [
        "depth",
        "module",
        "params",
        "main",
        "aux[1]",
        "aux[3]",
        "cos[1]",
        "cos[3]",
        "total",
    ]
    for row in report.rows:
        assert any(line.split()[:2] == [str(row["depth"]), row["module"]] for line in lines)
    assert f"{report.rows[0]['main']:.3e}" in text
    assert "taps: 1 after depth 1, 3 after depth 3" in text


def test_to_rows_returns_copies(report: GradientFlow) -> None:
    rows = report.to_rows()
    rows[0]["aux"]["1"] = -1.0
    rows[0]["main"] = -1.0
    assert report.rows[0]["aux"]["1"] > 0 and report.rows[0]["main"] > 0
    assert set(rows[0]) == {"module", "depth", "params", "main", "aux", "cosine", "total"}


def test_plot_writes_an_image(report: GradientFlow, tmp_path: Path) -> None:
    path = tmp_path / "flow.png"
    report.plot(path, title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_fix(
    report: GradientFlow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DeepSupError, match=r"needs matplotlib.*pip install matplotlib"):
        report.plot()


# --------------------------------------------------------------------------- suggest_taps


def test_suggested_names_are_accepted_by_the_wrapper_as_is() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=7)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 5])
    suggestions = suggest_taps(model, x, target=y, criterion=nn.CrossEntropyLoss(), k=3)
    assert 1 <= len(suggestions) <= 3
    names = [s.name for s in suggestions]
    assert len(set(names)) == len(names)
    sup = DeepSupervision(
        model, names, head=heads.classification(7), criterion=nn.CrossEntropyLoss()
    )
    out, aux = sup(x, target=y)
    assert sorted(aux) == sorted(names)
    assert all(s.reason and s.name in str(s) for s in suggestions)


def test_suggest_taps_ranks_the_most_decayed_boundaries_first() -> None:
    torch.manual_seed(6)
    model = deep_plain(depth=12)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 5, (6,))
    suggestions = suggest_taps(model, x, target=y, criterion=nn.CrossEntropyLoss(), k=3)
    assert all(isinstance(s, TapSuggestion) for s in suggestions)
    attenuations = [s.attenuation for s in suggestions]
    assert attenuations == sorted(attenuations)
    assert all(0 < a < 1 for a in attenuations)  # tanh with default init: gradient decays
    # the measured attenuation is that of the main-loss gradient at the suggestion's depth
    sup = DeepSupervision(
        model,
        [suggestions[0].name],
        head=heads.classification(5),
        criterion=nn.CrossEntropyLoss(),
        example_input=x,
    )
    rows = gradient_flow(sup, x, target=y, criterion=nn.CrossEntropyLoss()).rows

    def rms(row: dict[str, Any]) -> float:
        return float(row["main"]) / math.sqrt(row["params"])

    expected = rms(rows[suggestions[0].depth]) / rms(rows[-1])
    assert suggestions[0].attenuation == pytest.approx(expected, rel=1e-5)
    n = len(rows)
    assert all(0.2 * n - 1 <= s.depth < 0.9 * n for s in suggestions)  # neither stem nor head
    names = [s.name for s in suggestions]
    sup = DeepSupervision(
        model, names, head=heads.classification(5), example_input=x, criterion=nn.CrossEntropyLoss()
    )
    assert sorted(sup(x, target=y)[1]) == sorted(names)


def test_suggest_taps_has_no_side_effects() -> None:
    model = bn_net(1, 3).eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    before = snapshot(model)
    suggest_taps(model, x, target=y, criterion=nn.CrossEntropyLoss())
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("k", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_suggest_taps_rejects_a_bad_k(k: Any) -> None:
    with pytest.raises(DeepSupError, match="k must be an int >= 1"):
        suggest_taps(
            deep_plain(),
            torch.randn(2, 1, 8, 8),
            target=torch.tensor([0, 1]),
            criterion=nn.CrossEntropyLoss(),
            k=k,
        )


def test_suggest_taps_without_boundaries_says_what_to_do() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(DeepSupError, match=r"no stage boundary.*list_taps"):
        suggest_taps(
            model, torch.randn(2, 4), target=torch.tensor([0, 1]), criterion=nn.CrossEntropyLoss()
        )


# --------------------------------------------------------------------------- command line


def tiny_plain() -> nn.Sequential:
    """A model for ``python -m deepsup diagnose tests.test_diagnostics:tiny_plain``."""
    torch.manual_seed(0)
    return deep_plain(depth=9)


def test_diagnose_command_prints_suggestions_and_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepsup.__main__ import main

    chart = tmp_path / "flow.png"
    spec = "tests.test_diagnostics:tiny_plain"
    assert (
        main(["diagnose", spec, "--input", "4,1,12,12", "--classes", "5", "--plot", str(chart)])
        == 0
    )
    out = capsys.readouterr().out
    suggested = [
        line.split(":")[0].strip() for line in out.split("suggested taps")[1].splitlines()[1:4]
    ]
    assert all(s.endswith(".1") or s.isdigit() for s in suggested if s)
    header = next(line for line in out.splitlines() if line.startswith("depth"))
    for name in filter(None, suggested):
        assert f"aux[{name}]" in header
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_diagnose_command_with_given_taps(capsys: pytest.CaptureFixture[str]) -> None:
    from deepsup.__main__ import main

    argv = [
        "diagnose",
        "tests.test_diagnostics:tiny_plain",
        "--input",
        "4,1,12,12",
        "--classes",
        "5",
        "--taps",
        "2",
        "6",
        "--weight",
        "0.25",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gradient flow with aux weight 0.25 on 2, 6:" in out
    assert "taps: 2 after depth 2, 6 after depth 6" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "1,1,12,12", "--classes", "5"], "batch of 1; use 2 or more"),
        (["--input", "4,1,12,12", "--classes", "7"], r"returns \(4, 5\); diagnose needs logits"),
        (["--input", "4,1,12,12", "--classes", "5", "--taps", "nope"], "'nope'"),
    ],
    ids=["batch-of-one", "wrong-classes", "unknown-tap"],
)
def test_diagnose_command_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepsup.__main__ import main

    assert main(["diagnose", "tests.test_diagnostics:tiny_plain", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepsup diagnose: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)
