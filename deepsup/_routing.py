"""Per-sample routing inside a batch for :class:`~deepsup.EarlyExit` (``per_sample=True``).

At each exit the confident rows leave: their head's predictions are kept with their row
indices, and the tap's forward hook returns the tensor of the rows that continue, so the rest
of the model runs on fewer rows. At the end :meth:`Routing.assemble` puts every row's
prediction back in the input's order, with one exit name per row.

A model tolerates this when nothing batch-shaped other than the tap's output is carried past
the tap (a U-Net's skip connections, an attention mask passed as an input, a residual around
the tapped module are); :func:`check_rows` verifies it at construction on a dry run: rows that
continue past each tap must give the outputs they give in the full batch.

One host synchronisation per tap where rows are tested (the number of rows that leave).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._config import OUTPUT
from .errors import EarlyExitError

__all__ = ["LEAVE_EVEN", "Routing", "check_rows", "split_rows"]

# An internal threshold for the construction check: the even rows leave at this tap.
LEAVE_EVEN = "leave-even"


def split_rows(leave: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(keep, leaving, n_leaving)``: the row indices of a ``(B,)`` bool mask, in order, with
    one host synchronisation (the count; none when ``n``, the count, is given).

    Example:
        >>> keep, leaving, n = split_rows(torch.tensor([True, False, True, False]))
        >>> keep.tolist(), leaving.tolist(), n
        ([1, 3], [0, 2], 2)
    """
    if n is None:
        n = int(leave.sum())  # the one host synchronisation of this tap
    stay = leave.numel() - n
    if n == 0 or stay == 0:  # nothing to sort: no row leaves, or all do
        rows = torch.arange(leave.numel(), device=leave.device)
        return (rows, rows[:0], 0) if n == 0 else (rows[:0], rows, n)
    order = torch.argsort(leave.to(torch.uint8), stable=True)  # staying rows first, in order
    return order[:stay], order[stay:], n


class Routing:
    """The rows of one per-sample forward: which input rows still run, and what left where."""

    def __init__(self) -> None:
        self.batch = 0  # rows of the input, set at the first tap
        self.rows: torch.Tensor | None = None  # the input row of each running row (None: all)
        self.split = False  # whether some but not all rows left at a tap
        self.parts: list[tuple[str, torch.Tensor, Any]] = []  # (exit, input rows, predictions)
        self.kept: torch.Tensor | None = None  # the running rows the last step kept

    @staticmethod
    def rows_of(name: str, output: Any) -> int:
        """The number of rows of a tap's output; refuses what is not one batched tensor."""
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            raise EarlyExitError(
                f"per_sample=True: tap {name!r} returned {type(output).__name__}, but rows can "
                "leave only at a tap whose output is one tensor with the batch on dim 0; tap "
                "another module or use per_sample=False"
            )
        return output.shape[0]

    def step(self, name: str, output: torch.Tensor, leave: torch.Tensor, pred: Any) -> Any:
        """Let the rows of the ``(B,)`` mask ``leave`` go at ``name`` with their rows of
        ``pred`` (``None`` in the construction check); return the tap's output for the rows
        that continue, ``output`` itself when none leaves, or ``None`` when none is left."""
        if not self.split:
            self.batch = output.shape[0]
        n = int(leave.sum())  # the one host synchronisation of this tap
        if n == 0:
            return output
        rows = self.rows if self.rows is not None else torch.arange(self.batch, device=leave.device)
        if n == leave.numel():  # every row leaves: the forward stops here
            self.parts.append((name, rows, pred))
            self.rows = rows[:0]
            return None
        keep, leaving, _ = split_rows(leave, n)
        self.kept = keep
        self.split = True
        self.parts.append((name, rows[leaving], None if pred is None else pred[leaving]))
        self.rows = rows[keep]
        return output[keep]

    def assemble(self, output: Any) -> tuple[torch.Tensor, list[str]]:
        """Every row's prediction in input order, and the exit each row took (``"output"``
        for the rows that ran the whole model)."""
        if not self.parts:  # no row left early: the model's output
            n = output.shape[0] if isinstance(output, torch.Tensor) and output.dim() else 0
            return output, [OUTPUT] * n
        if not self.split and output is None:  # every row left together, in order
            name, _, pred = self.parts[0]
            return pred, [name] * self.batch
        parts = list(self.parts)
        if output is not None and self.rows is not None:
            parts.append((OUTPUT, self.rows, output))
        first = parts[0][2]
        dtype = first.dtype
        for _, _, p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        out = first.new_empty((self.batch, *first.shape[1:]), dtype=dtype)
        names = [OUTPUT] * self.batch
        for name, rows, pred in parts:
            if tuple(pred.shape[1:]) != tuple(out.shape[1:]):
                raise EarlyExitError(
                    f"per_sample=True puts every row's prediction in one tensor, but exit "
                    f"{name!r} predicts {tuple(pred.shape[1:])} per row and "
                    f"{parts[0][0]!r} {tuple(out.shape[1:])}; use per_sample=False, or heads "
                    "that predict what the model outputs"
                )
            out.index_copy_(0, rows, pred.to(dtype))
        index = torch.cat([rows for _, rows, _ in parts]).tolist()
        for (name, rows, _), start in zip(parts, _starts([r.numel() for _, r, _ in parts])):
            for i in index[start : start + rows.numel()]:
                names[i] = name
        return out, names


def _starts(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def check_rows(
    run: Callable[[Mapping[str, Any]], tuple[Any, Routing]],
    full: Any,
    predictions: Mapping[str, Any],
) -> None:
    """Verify on a dry run that rows may leave at each exit of ``predictions`` (its heads'
    predictions on the example, in execution order): each predicts what the model outputs per
    row (``full``, the model's output on the whole batch), and with the even rows leaving
    there, the model runs and the odd rows give their outputs in ``full``. ``run(thresholds)``
    runs a routed forward.

    Raises:
        EarlyExitError: the model fails, or the continuing rows' outputs differ, naming why.
    """
    if not isinstance(full, torch.Tensor) or full.dim() == 0 or full.shape[0] < 2:
        got = tuple(full.shape) if isinstance(full, torch.Tensor) else type(full).__name__
        raise EarlyExitError(
            f"per_sample=True needs a model that returns one tensor with the batch on dim 0, "
            f"and an example_input of at least 2 rows (the model returned {got}); use "
            "per_sample=False for whole-batch exits"
        )
    for name, pred in predictions.items():
        if not isinstance(pred, torch.Tensor) or tuple(pred.shape[1:]) != tuple(full.shape[1:]):
            got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise EarlyExitError(
                f"per_sample=True puts every row's prediction in one tensor, but exit {name!r} "
                f"predicts {got} and the model outputs {tuple(full.shape)}; use "
                "per_sample=False, or heads that predict what the model outputs per row"
            )
    for name in predictions:
        try:
            output, routing = run({name: LEAVE_EVEN})
        except EarlyExitError:
            raise
        except Exception as err:
            raise EarlyExitError(
                f"per_sample=True: the model fails when rows leave at tap {name!r} "
                f"({type(err).__name__}: {err}). It carries batch-shaped tensors past that tap "
                "(a U-Net's skip connections, a residual around the tapped module, an attention "
                "mask or another input with a batch dimension), so the rest of the forward "
                "cannot run on fewer rows. Use per_sample=False (whole-batch exits), or tap "
                "a module that is the only path from the input to the output"
            ) from err
        expected = full[routing.rows]
        same = (
            isinstance(output, torch.Tensor)
            and output.shape == expected.shape
            and torch.allclose(
                output.double(),
                expected.double(),
                rtol=1e-4,
                atol=1e-5 * max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0),
            )
        )
        if not same:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise EarlyExitError(
                f"per_sample=True: when rows leave at tap {name!r}, the rows that continue do "
                f"not give the outputs they give in the full batch (got {got}, expected "
                f"{tuple(expected.shape)}{_diff(output, expected)}). The model mixes rows "
                "after the tap (batch statistics, attention across the batch, a batch-shaped "
                "tensor broadcast from before the tap). Use per_sample=False (whole-batch exits)"
            )


def _diff(output: Any, expected: torch.Tensor) -> str:
    if isinstance(output, torch.Tensor) and output.shape == expected.shape:
        return (
            f", max abs difference {float((output.double() - expected.double()).abs().max()):.3g}"
        )
    return ""
