"""examples/pspnet_voc.py under bad input: one-line errors, exit code 2, before any training."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import pspnet_voc  # noqa: E402


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the example; it must exit with code 2 and one error line, no traceback."""
    with pytest.raises(SystemExit) as info:
        pspnet_voc.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--epochs", "0"], r"argument --epochs: must be a positive int \(got 0\)"),
        (["--crop-size", "0"], r"argument --crop-size: must be a positive int \(got 0\)"),
        (["--batch-size", "-2"], r"argument --batch-size: must be an int >= 0 \(got -2\)"),
        (["--workers", "x"], r"argument --workers: must be an int \(got 'x'\)"),
        (["--aux-weight", "nan"], r"--aux-weight must be a finite number >= 0"),
        (["--device", "tpu9"], r"--device 'tpu9' is not a device"),
        (["--resume", "/no/such/last.pt"], r"--resume '/no/such/last\.pt': no such file"),
        (["--weights", "/no/such/w.pth"], r"--weights '/no/such/w\.pth': no such file"),
    ],
    ids=["epochs", "crop", "batch", "workers", "aux-weight", "device", "resume", "weights"],
)
def test_bad_arguments_are_argparse_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], match: str
) -> None:
    line = usage_error(capsys, [*argv, "--out", str(tmp_path / "run")])
    assert re.search(match, line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = usage_error(capsys, ["--device", "cuda", "--out", str(tmp_path)])
    assert "--device 'cuda': no CUDA GPU is available here; use --device cpu" in line


def test_out_that_cannot_be_written_fails_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "run"  # a folder below a file: cannot be created, even by root
    line = usage_error(capsys, ["--out", str(out)])
    assert f"--out {str(out)!r} is not a writable folder" in line


@pytest.mark.parametrize("module", ["matplotlib", "PIL"])
def test_a_missing_optional_dependency_fails_at_start(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
) -> None:
    # Both imported for real first: matplotlib imports PIL, so a first import of matplotlib with
    # PIL blocked would fail (and leave half of matplotlib in sys.modules for later tests).
    for name in ("matplotlib", "PIL"):
        importlib.import_module(name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    line = usage_error(capsys, ["--out", str(tmp_path)])
    package = {"PIL": "pillow"}.get(module, module)
    assert f"{package} is not installed" in line and f"pip install {package}" in line


def test_resume_of_a_truncated_or_foreign_file_names_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = tmp_path / "good.pt"
    torch.save({"epoch": 0, "model": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, match in (
        (truncated, "truncated or not a torch.save file"),
        (foreign, "is not a last.pt written by this script (no epoch, model, optimizer"),
    ):
        with pytest.raises(SystemExit) as info:
            pspnet_voc.read_checkpoint(path)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and match in err, err


def test_checkpoints_are_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    pspnet_voc.save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def dies_halfway(obj: object, f: object) -> None:
        real_save({"partial": torch.zeros(10)}, f)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(pspnet_voc.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        pspnet_voc.save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}  # the old one, intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
