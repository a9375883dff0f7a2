"""Export of the eval wrapper: TorchScript trace, ``torch.export``, ONNX; script of ``unwrap()``.

In eval mode the wrapper's forward is ``return self.model(...)``, so every exporter records the
bare model's graph: the same aten ops as exporting the bare model, no head op, and the same
outputs. ``torch.jit.script`` cannot compile Python forward hooks: scripting the wrapper raises
``DeepSupScriptError`` pointing to ``torch.jit.script(sup.unwrap())``, which works.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from conftest import ConvNet
from torch import nn

import deepsup
from deepsup import DeepSupervision, heads

NUM_CLASSES = 4

# torch.jit.trace/script are deprecated in favour of torch.export; they still work and are tested.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


MODELS = {
    "convnet": (functools.partial(ConvNet, NUM_CLASSES), {"stage1": 0.4, "stage2": 0.2}),
    "resnet18": (lambda: tvm.resnet18(weights=None, num_classes=NUM_CLASSES), {"layer3": 0.4}),
}


@functools.cache
def _prepared(name: str) -> tuple[DeepSupervision, nn.Module]:
    build, taps = MODELS[name]
    torch.manual_seed(0)
    model = build()
    bare = copy.deepcopy(model)  # made before wrapping
    sup = DeepSupervision(model, taps, head=heads.seg(NUM_CLASSES), criterion=nn.CrossEntropyLoss())
    # One training step first, so the heads are real and the model's BN statistics moved.
    x = torch.randn(2, 3, 32, 32)
    _, aux = sup(x, target=torch.randint(0, NUM_CLASSES, (2, 32, 32)))
    sum(aux.values()).backward()
    bare.load_state_dict(sup.model.state_dict())
    return sup.eval(), bare.eval()


def _setup(name: str) -> tuple[DeepSupervision, nn.Module, torch.Tensor]:
    """The eval wrapper, the bare model with the same weights, and an input (fresh copies)."""
    sup, bare = copy.deepcopy(_prepared(name))
    return sup, bare, torch.randn(1, 3, 32, 32)


def _head_ops(sup: DeepSupervision) -> set[str]:
    """Parameter names of the heads, as they appear in exported programs."""
    return {f"heads.{name}" for name, _ in sup.heads.named_parameters()}


def _jit_ops(module: torch.jit.ScriptModule) -> Counter[str]:
    """The tensor ops of a traced graph. Shape glue (``aten::size``, ``aten::Int``) is left
    out: tracing records it differently at the top level than in a submodule, for any wrapper."""
    return Counter(
        n.kind()
        for n in module.inlined_graph.nodes()
        if n.kind().startswith("aten::")
        and any(isinstance(o.type(), torch._C.TensorType) for o in n.outputs())
    )


def _export_ops(program: torch.export.ExportedProgram) -> Counter[str]:
    return Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_jit_trace_of_the_eval_wrapper_is_the_bare_graph(name: str) -> None:
    sup, bare, x = _setup(name)
    # check_trace=False: the checks below compare the graphs and outputs themselves.
    traced = torch.jit.trace(sup, x, check_trace=False)
    traced_bare = torch.jit.trace(bare, x, check_trace=False)
    ops = _jit_ops(traced)
    assert ops == _jit_ops(traced_bare)
    assert sum(ops.values()) > 0
    assert torch.equal(traced(x), bare(x))
    assert torch.equal(traced(x), traced_bare(x))


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_torch_export_of_the_eval_wrapper_is_the_bare_graph(name: str) -> None:
    sup, bare, x = _setup(name)
    program = torch.export.export(sup, (x,))
    program_bare = torch.export.export(bare, (x,))
    assert _export_ops(program) == _export_ops(program_bare)
    # The heads' parameters are lifted as graph inputs (they belong to the wrapper), but no
    # node uses them: the graph holds no head. Export `sup.model` for a program without them.
    head_inputs = [
        n for n in program.graph.nodes if n.op == "placeholder" and n.name.startswith("p_heads_")
    ]
    assert len(head_inputs) == len(_head_ops(sup))
    assert all(not n.users for n in head_inputs)
    assert torch.equal(program.module()(x), bare(x))

    program_model = torch.export.export(sup.model, (x,))
    assert _export_ops(program_model) == _export_ops(program_bare)
    assert not any(k.startswith("heads.") for k in program_model.state_dict)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_onnx_export_of_the_eval_wrapper_is_the_bare_graph(name: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # the default (dynamo) exporter needs it
    sup, bare, x = _setup(name)
    torch.onnx.export(sup, (x,), tmp_path / "sup.onnx")
    torch.onnx.export(bare, (x,), tmp_path / "bare.onnx")
    graph = onnx.load(tmp_path / "sup.onnx").graph
    graph_bare = onnx.load(tmp_path / "bare.onnx").graph
    assert Counter(n.op_type for n in graph.node) == Counter(n.op_type for n in graph_bare.node)
    assert not any("heads" in i.name for i in graph.initializer)
    assert len(graph.initializer) == len(graph_bare.initializer)

    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "sup.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = bare(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter is deprecated
def test_legacy_onnx_exporter_takes_the_model(tmp_path: Path) -> None:
    """The TorchScript-based exporter (``dynamo=False``) passes keyword-only ``target=``
    positionally and needs tensor-only state, so it cannot take the wrapper: the documented path
    is ``sup.model``, which exports the bare graph."""
    onnx = pytest.importorskip("onnx")
    sup, bare, x = _setup("convnet")
    torch.onnx.export(sup.model, (x,), tmp_path / "model.onnx", dynamo=False)
    torch.onnx.export(bare, (x,), tmp_path / "bare.onnx", dynamo=False)
    graph = onnx.load(tmp_path / "model.onnx").graph
    graph_bare = onnx.load(tmp_path / "bare.onnx").graph
    assert Counter(n.op_type for n in graph.node) == Counter(n.op_type for n in graph_bare.node)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), bare(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_jit_script_of_unwrap(name: str) -> None:
    sup, bare, x = _setup(name)
    scripted = torch.jit.script(sup.unwrap())
    with torch.no_grad():
        assert torch.equal(scripted(x), bare(x))


def test_jit_script_of_the_wrapper_says_to_unwrap() -> None:
    sup, _, _ = _setup("convnet")
    with pytest.raises(
        deepsup.errors.DeepSupScriptError, match=r"torch\.jit\.script\(sup\.unwrap\(\)\)"
    ):
        torch.jit.script(sup)
    sup.train()
    with pytest.raises(deepsup.errors.DeepSupScriptError, match="unwrap"):
        torch.jit.script(sup)
