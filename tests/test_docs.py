"""The code in README.md, docs/*.md and the public contract (API.md) runs as written; the site
covers every public name, error class and schedule (tests/test_site.py builds it)."""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import tree_env
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "design" / "API.md"
FENCE = re.compile(r"```python[^\n]*\n(.*?)```", re.S)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)  # pymdownx.snippets: a file's text, inlined


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
    """The python blocks of a Markdown file, with snippet lines replaced by the file they name."""
    blocks = [textwrap.dedent(code) for code in FENCE.findall(path.read_text())]  # in a list
    return [SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), code) for code in blocks]


# The first line of a block that cannot run as pasted here says so, and why: "# not run: <why>"
# (a GPU, a data set, a download); "# run with: torchrun ..." marks a script for torchrun.
NOT_RUN = re.compile(r"^# not run[^:\n]*: \S")
TORCHRUN = "# run with: torchrun"


def _kind(code: str) -> str:
    if code.startswith("# not run"):
        return "not run"
    return "torchrun" if code.startswith(TORCHRUN) else "python"


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CASES = [
    pytest.param(path, i, code, id=f"{path.relative_to(ROOT)}-{i}")
    for path in DOCS
    for i, code in enumerate(_blocks(path))
]
RUN = [case for case in CASES if _kind(case.values[2]) == "python"]
RUN_WITH_TORCHRUN = [case for case in CASES if _kind(case.values[2]) == "torchrun"]


def _run_alone(launcher: list[str], code: str, folder: Path, name: str) -> None:
    """The block pasted into an empty file in an empty folder (its /tmp/ paths moved there) and
    run there by ``launcher`` with this tree's deepsup; fails with the block's output."""
    script = folder / "block.py"
    script.write_text(code.replace("/tmp/", f"{folder}/"))
    done = subprocess.run(
        [*launcher, str(script)],
        cwd=folder,
        env=tree_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed when run alone:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize(("path", "index", "code"), RUN)
def test_doc_code_blocks_run_alone(path: Path, index: int, code: str, tmp_path: Path) -> None:
    """Each block runs by itself, as a user pastes it into an empty file: its own process, no
    names from earlier blocks or from the test."""
    _run_alone([sys.executable], code, tmp_path, f"{path.relative_to(ROOT)}[{index}]")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("path", "index", "code"), RUN_WITH_TORCHRUN)
def test_doc_torchrun_blocks_run_alone(path: Path, index: int, code: str, tmp_path: Path) -> None:
    """A block for torchrun runs as the script it is, on 2 CPU processes (gloo)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    name = f"{path.relative_to(ROOT)}[{index}] under torchrun"
    _run_alone([*torchrun, "2"], code, tmp_path, name)


def test_every_python_block_is_collected_and_checks_its_result() -> None:
    """No block slips past the fence regex, and each run block asserts what it shows."""
    for path in DOCS:
        assert path.read_text().count("```python") == len(_blocks(path)), path.name
    silent = [
        case.id
        for case in RUN + RUN_WITH_TORCHRUN
        if not re.search(r"^\s*(assert |raise AssertionError)", case.values[2], re.M)
    ]
    assert silent == [], f"doc blocks that assert nothing: {silent}"
    assert {case.values[0].name for case in RUN} >= {"README.md", "concepts.md", "recipes.md"}
    unexplained = [
        case.id
        for case in CASES
        if _kind(case.values[2]) == "not run" and not NOT_RUN.match(case.values[2])
    ]
    assert unexplained == [], f"'# not run' blocks that do not say why on that line: {unexplained}"
    hidden = [case.id for case in RUN if "# not run" in case.values[2]]
    assert hidden == [], f"'# not run' below the first line (the block runs): {hidden}"


@pytest.mark.skipif(not CONTRACT.exists(), reason="../shared/design/API.md is not beside the repo")
def test_the_contract_example_runs_as_written() -> None:
    blocks = _blocks(CONTRACT)
    assert blocks, "API.md has no python block"
    namespace = _contract_namespace()
    exec(compile(blocks[0], "API.md", "exec"), namespace)
    sup, model, images = namespace["sup"], namespace["model"], namespace["images"]
    assert torch.equal(sup(images), model(images))  # type: ignore[operator]


# --- the site: every error class, raised exception type, public name and schedule is covered ---

TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"


def _load_script(name: str) -> types.ModuleType:
    """A module from tools/ (not a package), imported by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _deepsup_modules() -> list[types.ModuleType]:
    """deepsup and every module in it, imported (so that every exception class is defined)."""
    import deepsup

    names = [info.name for info in pkgutil.walk_packages(deepsup.__path__, "deepsup.")]
    return [deepsup, *(importlib.import_module(n) for n in names if not n.endswith("__main__"))]


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def _headings(path: Path) -> set[str]:
    return {m.strip() for m in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


def test_every_error_and_warning_class_has_a_troubleshooting_section() -> None:
    import deepsup

    _deepsup_modules()
    classes = {deepsup.DeepSupError, deepsup.errors.DeepSupWarning}
    classes |= _subclasses(deepsup.DeepSupError) | _subclasses(deepsup.errors.DeepSupWarning)
    ours = {c for c in classes if c.__module__.startswith("deepsup") and c.__name__[0] != "_"}
    headings = _headings(TROUBLESHOOTING)
    missing = sorted(
        f"{c.__module__}.{c.__qualname__}" for c in ours if f"`{c.__name__}`" not in headings
    )
    assert not missing, (
        f"docs/troubleshooting.md has no section (a heading '## `Name`') for {missing}: add one "
        "per class with its messages, what they mean and the fix"
    )
    assert len(ours) >= 8  # the base, the warning, six errors of the core and WeightsError


def _raised_exception_types(module: types.ModuleType) -> set[str]:
    """Names of the exception classes a module raises by name (`raise X(...)`, `raise a.X(...)`)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        expr = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        first, *rest = ast.unparse(expr).split(".")
        obj = vars(module).get(first, getattr(builtins, first, None))
        for part in rest:
            obj = getattr(obj, part, None)
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__name__[0] != "_":
            names.add(obj.__name__)  # private classes are control flow that never reaches users
    return names


def test_every_exception_type_deepsup_raises_is_on_the_troubleshooting_page() -> None:
    raised = set().union(*(_raised_exception_types(m) for m in _deepsup_modules()))
    text = TROUBLESHOOTING.read_text()
    missing = sorted(name for name in raised if f"`{name}`" not in text and name not in text)
    assert not missing, (
        f"deepsup raises {missing} but docs/troubleshooting.md does not mention them: say what "
        "each message means and how to fix it"
    )
    assert {"TargetError", "CaptureError"} <= raised


def test_the_api_reference_has_every_public_name() -> None:
    import deepsup

    hooks = _load_script("mkdocs_hooks")
    markdown = hooks.api_markdown()
    directives = set(re.findall(r"^::: (\S+)$", markdown, re.M))
    members = {
        f"{module}.{name}"
        for module, listed in re.findall(
            r"^::: (\S+)\n(?:    .*\n)*?      members: \[(.*)\]$", markdown, re.M
        )
        for name in listed.split(", ")
    }
    top = {id(getattr(deepsup, n)): f"deepsup.{n}" for n in deepsup.__all__}
    public = {"deepsup": deepsup, **{m.__name__: m for m in hooks.public_submodules(deepsup)}}
    missing = []
    for module_name, module in public.items():
        for name in getattr(module, "__all__", []):
            full = f"{module_name}.{name}"
            also = top.get(id(getattr(module, name)), "")
            if isinstance(getattr(module, name), types.ModuleType):
                also = f"deepsup.{name}"  # a submodule in __all__: its own section
            if not {full, also} & (directives | members):
                missing.append(full)
    assert not missing, (
        f"the API reference leaves out {missing}; tools/mkdocs_hooks.py builds it from "
        "`deepsup.__all__` and the public submodules' `__all__`"
    )
    assert {"deepsup.DeepSupervision", "deepsup.heads", "deepsup.models"} <= directives


def test_every_schedule_has_a_plot_on_the_schedules_page() -> None:
    plots = _load_script("plot_schedules")
    page = (ROOT / "docs" / "schedules.md").read_text()
    names = plots.schedule_classes()
    assert {"Constant", "LinearDecay", "CosineDecay", "Cutoff"} <= set(names)
    missing = [
        n
        for n in names
        if n not in plots.EXAMPLES
        or f"](assets/schedules/{n}.png)" not in page
        or not (ROOT / "docs" / "assets" / "schedules" / f"{n}.png").is_file()
    ]
    assert not missing, (
        f"schedules {missing} have no plot on docs/schedules.md: add an example to EXAMPLES in "
        "tools/plot_schedules.py, run it, and add a section with the image to the page"
    )


def test_the_plotted_weights_are_the_schedules_values(tmp_path: Path) -> None:
    plots = _load_script("plot_schedules")
    for examples in plots.EXAMPLES.values():
        for schedule in examples:
            assert plots.weights_over_training(schedule, total=30) == pytest.approx(
                [schedule(t) for t in range(31)], abs=1e-6
            )
    written = plots.plot_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in plots.schedule_classes())
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_the_voc_samples_figure_is_drawn_from_the_generator(tmp_path: Path) -> None:
    samples = _load_script("plot_voc_samples")
    written = samples.plot_samples(tmp_path / "samples.png", count=2)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](img/voc_hard_samples.png)" in (ROOT / "docs" / "evidence.md").read_text()


def test_snippet_lines_are_replaced_by_the_file() -> None:
    example = (ROOT / "examples" / "minimal.py").read_text().strip()
    assert any(block.strip() == example for block in _blocks(ROOT / "docs" / "quickstart.md"))


def test_every_docs_page_is_in_the_site_nav() -> None:
    nav = set(re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert nav <= pages, f"mkdocs.yml's nav names pages that do not exist: {sorted(nav - pages)}"
    assert not pages - nav, (
        f"docs/ pages missing from the site's nav in mkdocs.yml: {sorted(pages - nav)}; add "
        "each under `nav:` (mkdocs build --strict fails on them too)"
    )


def test_the_readme_links_every_site_page() -> None:
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    readme = (ROOT / "README.md").read_text()
    missing = [page for page in nav if f"](docs/{page})" not in readme]
    assert not missing, f"README.md's Documentation list does not link {missing}"
