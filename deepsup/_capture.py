"""Forward hooks that capture tapped outputs, and the per-call, per-thread capture window.

Rules (see PITFALLS.md): hooks are registered once and only capture; they return ``None``;
they do nothing outside a window; a window belongs to one thread and one forward call and is
closed in ``finally``. Hooks are small objects (not closures), so a deep copy of the model feeds
the copy's store and pickling works.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from ._checks import add_note, call_user
from ._config import Selector
from .errors import CaptureError, TapOutputError, UsageError
from .functional import first_tensor

T = TypeVar("T")


class Record(NamedTuple):
    """One call of a tapped module inside a window."""

    tensor: torch.Tensor
    version: int
    grad_enabled: bool


def select_tensor(output: Any, select: Selector | None, tap: str) -> torch.Tensor:
    """Pick the tensor to feed a head from a module's output."""
    if select is None:
        picked = first_tensor(output)
    elif callable(select):
        picked = call_user(
            select,
            output,
            note=lambda: (
                f"deepsup: raised by the select= callable of tap {tap!r} (on an output "
                f"of type {type(output).__name__})"
            ),
        )
    elif isinstance(select, int) and isinstance(output, (tuple, list)):
        picked = output[select] if -len(output) <= select < len(output) else None
    elif isinstance(select, str) and isinstance(output, Mapping):
        picked = output.get(select)
    elif isinstance(select, str):
        picked = getattr(output, select, None)
    else:
        picked = None
    if not isinstance(picked, torch.Tensor):
        how = "the default rule" if select is None else f"select={select!r}"
        raise TapOutputError(
            f"tap {tap!r}: {how} found no tensor in an output of type {type(output).__name__} "
            f"(got {type(picked).__name__}); pass Tap(select=...) with an index, a key or a "
            "callable that returns the tensor to supervise"
        )
    return picked


class Capture:
    """Holds the capture windows of one wrapper; its hooks write into the open window."""

    def __init__(self) -> None:
        self._local = threading.local()
        # Set up front (not only by window()), so torch.compile guards on the same attribute
        # state in the first and later calls: one compile per mode, not two.
        self._local.records = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]  # per-thread, per-call state never travels with a copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._local.records = None

    def records(self) -> dict[str, list[Record]] | None:
        """The open window of this thread, or None."""
        return getattr(self._local, "records", None)

    @contextmanager
    def window(self) -> Iterator[dict[str, list[Record]]]:
        """Open a capture window for one forward call on this thread."""
        if self.records() is not None:
            raise UsageError(
                "DeepSupervision's training forward was re-entered on the same thread (the "
                "wrapper called inside its own forward); call the wrapped model instead"
            )
        records: dict[str, list[Record]] = {}
        self._local.records = records
        try:
            yield records
        finally:
            self._local.records = None


def as_call(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An example input as call arguments: a tensor, a tuple of arguments or a dict of kwargs."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, tuple):
        return example_input, {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    return (example_input,), {}


def _shapes(example_input: Any) -> str:
    args, kwargs = as_call(example_input)
    shown = [str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
    shown += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return ", ".join(shown) or type(example_input).__name__


def dry_run(
    model: nn.Module,
    example_input: Any,
    window: AbstractContextManager[T],
    kwargs: Mapping[str, Any] | None = None,
) -> T:
    """Run ``model`` once on ``example_input`` in eval mode, without gradient, inside ``window``
    (a context manager: a capture window, or recording hooks); return what ``window`` gave.

    Every module's ``training`` flag is restored afterwards, so a partially frozen model keeps
    its modes; BatchNorm statistics are not touched (eval mode). An exception from the model is
    re-raised as itself, with a note naming the example input. With ``kwargs`` given,
    ``example_input`` is the tuple of positional arguments and ``kwargs`` the keywords.
    """
    modes = [(m, m.training) for m in model.modules()]
    if kwargs is None:
        args, kwargs = as_call(example_input)
    else:
        args = tuple(example_input)
    try:
        model.eval()
        with torch.no_grad(), window as value:
            model(*args, **kwargs)
        return value
    except Exception as err:
        if not isinstance(err, UsageError):
            add_note(
                err,
                f"deepsup: raised in the dry run on example_input= (shapes "
                f"{_shapes(example_input)}); "
                "example_input must be a batch, as the model takes in training (x[None] or "
                "x.unsqueeze(0) for one sample)",
            )
        raise
    finally:
        for m, mode in modes:
            m.training = mode


class TapHook:
    """The forward hook of one tap: records the selected tensor of each call in a window."""

    def __init__(self, capture: Capture, name: str, select: Selector | None, clone: bool) -> None:
        self.capture = capture
        self.name = name
        self.select = select
        self.clone = clone

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        records = self.capture.records()
        if records is None:
            return None
        tensor = select_tensor(output, self.select, self.name)
        if self.clone:
            tensor = tensor.clone()
        version = -1 if torch.compiler.is_compiling() else tensor._version
        records.setdefault(self.name, []).append(Record(tensor, version, torch.is_grad_enabled()))
        return None

    def __repr__(self) -> str:
        return f"deepsup.TapHook({self.name!r})"


def pick_calls(name: str, calls: str, count: int, forward: str = "training forward") -> range:
    """Which calls of a tap count, by its ``calls`` rule, when it ran ``count`` times in one
    forward: the one rule of the training forward, ``exits()`` and ``EarlyExit``.

    Raises:
        CaptureError: it did not run, or ran more than once with ``calls="error"``.

    Example:
        >>> pick_calls("x", "last", 3), pick_calls("x", "all", 2)
        (range(2, 3), range(0, 2))
    """
    if count == 0:
        raise CaptureError(
            f"tap {name!r} did not run in this {forward}. Is it skipped in training, "
            "called through `.forward()` (which bypasses hooks), or replaced after wrapping "
            "(SyncBatchNorm conversion, fusion, quantization: convert first, then wrap)? "
            "`deepsup.list_taps(model, example_input)` shows which modules run"
        )
    if count > 1 and calls == "error":
        raise CaptureError(
            f"tap {name!r} ran {count} times in one forward (a shared or reused module); "
            "pass Tap(calls='first'), 'last' or 'all', or tap a module that runs once"
        )
    if calls == "first":
        return range(1)
    if calls == "last":
        return range(count - 1, count)
    return range(count)


def captured(
    name: str,
    records: list[Record],
    *,
    calls: str,
    detach: bool,
    grad_enabled: bool,
    forward: str = "training forward",
) -> list[torch.Tensor]:
    """Validate one tap's captures after the model's forward; return the tensors to use."""
    out = []
    for i in pick_calls(name, calls, len(records), forward):
        r = records[i]
        if r.version >= 0 and r.tensor._version != r.version:
            raise CaptureError(
                f"tap {name!r}: its output was changed in place later in the forward (an "
                "in-place op such as ReLU(inplace=True) after it), so the head would see other "
                "features than the module produced; pass Tap(clone=True), or tap the module "
                "that applies the in-place op"
            )
        if grad_enabled and not r.grad_enabled and not detach:
            raise CaptureError(
                f"tap {name!r} was captured while autograd was off (inside reentrant activation "
                "checkpointing, use_reentrant=True, or under torch.no_grad() in the model), so "
                "its aux loss could not reach the model. Use torch.utils.checkpoint(..., "
                "use_reentrant=False), tap a module outside the checkpointed part, or pass "
                "Tap(detach=True) to train the head alone on detached features"
            )
        out.append(r.tensor.detach() if detach else r.tensor)
    return out
