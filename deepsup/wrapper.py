"""``DeepSupervision``: auxiliary heads and losses on named intermediate modules of any model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, NoReturn

import torch
from torch import nn

from ._capture import Capture, Record, TapHook, check_records
from ._channels import channel_dim, from_feature_info, from_last_layer
from ._errors import ChannelInferenceError, DeepSupError, DeepSupScriptError, TargetError
from ._resize import Resize, check_resize, reconcile
from ._taps import CALLS, INHERIT, Calls, Tap, TapsArg, resolve_taps
from .losses import teacher_for, wants_teacher
from .schedules import Schedule, as_schedule

__all__ = ["AuxLosses", "DeepSupervision", "HeadDict"]


class AuxLosses(dict):  # type: ignore[type-arg]
    """``{tap name: weighted aux loss}``, with the unweighted losses in :attr:`raw`.

    ``raw`` holds detached values, for logging; only the weighted losses carry gradient.

    A plain ``dict`` in every other respect, so ``sum(aux.values())`` is the total aux loss.

    Example:
        >>> import torch
        >>> aux = AuxLosses({"layer3": torch.tensor(0.5)}, raw={"layer3": torch.tensor(1.0)})
        >>> float(sum(aux.values())), float(aux.raw["layer3"])
        (0.5, 1.0)
    """

    def __init__(self, losses: Mapping[str, Any], *, raw: Mapping[str, Any]) -> None:
        super().__init__(losses)
        self.raw: dict[str, Any] = dict(raw)


def _escape(name: str) -> str:
    return name.replace(".", "/")


class HeadDict(nn.ModuleDict):
    """The heads, keyed by tap name (``sup.heads["backbone.layer3"]``).

    Module keys cannot hold dots, so they are stored with ``/`` for ``.``; state_dict keys read
    ``heads.backbone/layer3.conv.weight``.

    Example:
        >>> from torch import nn
        >>> h = HeadDict({"a.b": nn.Linear(1, 1)})
        >>> list(h), "a.b" in h
        (['a.b'], True)
    """

    def __init__(self, heads: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__({_escape(k): v for k, v in (heads or {}).items()})

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(_escape(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(_escape(key))

    def __iter__(self) -> Iterator[str]:
        return (k.replace("/", ".") for k in super().__iter__())

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(iter(self))

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


def _with_context(err: Exception, context: str) -> Exception:
    """The same exception type with the tap's context prepended, where it can be rebuilt."""
    msg = f"{context}: {err}"
    try:
        new = type(err)(msg)
    except Exception:
        new = RuntimeError(msg)
    if not isinstance(new, type(err)) or str(new) != msg:
        new = RuntimeError(msg)
    return new


def _as_call(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, tuple):
        return example_input, {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    return (example_input,), {}


def dry_run(model: nn.Module, capture: Capture, example_input: Any) -> dict[str, list[Record]]:
    """Run the model once in eval mode without gradient inside a capture window.

    Every module's ``training`` flag is restored afterwards, so a partially frozen model keeps
    its modes; BatchNorm statistics are not touched (eval mode).
    """
    modes = [(m, m.training) for m in model.modules()]
    args, kwargs = _as_call(example_input)
    try:
        model.eval()
        with torch.no_grad(), capture.window() as records:
            model(*args, **kwargs)
        return records
    finally:
        for m, mode in modes:
            m.training = mode


class DeepSupervision(nn.Module):
    """Deep supervision for an unmodified model: aux heads and losses on named modules.

    Forward hooks registered once, at construction, capture the outputs of the tapped modules
    during a training forward; after the model returns, each tap's head runs on its capture and
    its criterion compares the prediction with the target. In eval mode the wrapper *is* the
    model: ``sup(x)`` returns ``model(x)``, bit for bit, and no head runs.

    Args:
        model: any ``nn.Module``; its code and parameters are not changed.
        taps: a module name, a list of names, or a dict mapping names to a weight (float or
            :mod:`~deepsup.schedules` schedule) or a :class:`Tap`. Names are those of
            ``model.named_modules()``; glob patterns match several (``*`` within one name
            component, ``**`` across dots). A bare name gets weight 0.4.
        head: a head factory ``in_channels -> nn.Module`` (see :mod:`deepsup.heads`) or a ready
            module, for the taps whose :class:`Tap` does not set one. A ready module used by
            several taps is deep-copied per tap.
        criterion: ``criterion(prediction, target) -> loss`` for every tap; ``None`` makes a
            training forward return the heads' predictions instead of losses.
        resize: how a dense prediction and a target of another spatial size are reconciled:
            ``"prediction"`` upsamples the prediction to the target (bilinear, as PSPNet),
            ``"target"`` downsamples the target to the prediction (nearest, by indexing: exact
            for integer labels, ignore labels kept; cheaper, as nnU-Net), ``None`` requires
            equal sizes.
        align_corners: ``align_corners`` of the bilinear upsampling (the PSPNet reference uses
            True, torchvision's segmentation models False).
        example_input: an input (a tensor, a tuple of positional arguments or a dict of keyword
            arguments) for one dry run at construction (eval mode, no gradient) that infers the
            heads' input channels exactly. Without it, channels come from timm's
            ``feature_info`` or the tapped module's last conv/norm/linear.
        calls: the default of :attr:`Tap.calls` (a module that runs several times per forward).
        clone: the default of :attr:`Tap.clone`.

    Raises:
        TapNotFoundError: a tap names no submodule (the message lists close matches).
        ChannelInferenceError: a head's input channels cannot be inferred.

    Shape:
        Training: ``sup(*args, target=target, **kwargs)`` returns ``(output, aux)``, ``output``
        exactly what ``model(*args, **kwargs)`` returns and ``aux`` an :class:`AuxLosses`
        ``{tap: weight * criterion(prediction, target)}`` (with ``.raw`` unweighted and
        detached, for logging), or
        ``{tap: prediction}`` when ``criterion=None``. ``target`` may also be a dict
        ``{tap: target}``. Eval: ``sup(*args, **kwargs)`` returns ``model(*args, **kwargs)``;
        ``target=`` is accepted and ignored.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)
        ... )
        >>> sup = DeepSupervision(
        ...     model, taps={"0": 0.4}, head=heads.seg(num_classes=4),
        ...     criterion=nn.CrossEntropyLoss(), clone=True,
        ... )
        >>> x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
        >>> out, aux = sup(x, target=y)
        >>> out.shape, list(aux)
        (torch.Size([2, 4, 8, 8]), ['0'])
        >>> _ = sup.eval()
        >>> torch.equal(sup(x), model(x))
        True
    """

    _weight_values: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        taps: TapsArg,
        *,
        head: Callable[[int], nn.Module] | nn.Module | None = None,
        criterion: Callable[..., Any] | None = None,
        resize: Resize = "prediction",
        align_corners: bool = False,
        example_input: Any = None,
        calls: Calls = "error",
        clone: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (got {type(model).__name__})")
        if isinstance(model, DeepSupervision):
            raise TypeError(
                "model is already a DeepSupervision; add the taps to one wrapper instead"
            )
        if calls not in CALLS:
            raise ValueError(f"calls must be one of {CALLS} (got {calls!r})")
        check_resize(resize)
        self.model = model
        if isinstance(criterion, nn.Module):
            self.criterion: Callable[..., Any] | None = criterion
        else:
            self.criterion = criterion

        resolved = resolve_taps(model, taps)
        self.taps: dict[str, Tap] = {}
        for name, (_, tap) in resolved.items():
            self.taps[name] = replace(
                tap,
                weight=as_schedule(tap.weight),
                criterion=criterion if tap.criterion is INHERIT else tap.criterion,
                resize=resize if tap.resize is INHERIT else check_resize(tap.resize),
                align_corners=align_corners if tap.align_corners is None else tap.align_corners,
                calls=calls if tap.calls is None else tap.calls,
                clone=clone if tap.clone is None else tap.clone,
                head=tap.head if tap.head is not None else head,
            )

        self._capture = Capture()
        self._handles = []
        for name, (module, _) in resolved.items():
            tap = self.taps[name]
            hook = TapHook(self._capture, name, tap.select, bool(tap.clone))
            self._handles.append(module.register_forward_hook(hook))

        self.heads = HeadDict(self._build_heads(resolved, example_input))
        tap_criteria = {
            n: t.criterion
            for n, t in self.taps.items()
            if isinstance(t.criterion, nn.Module) and t.criterion is not criterion
        }
        if tap_criteria:  # registered so that .to(device) moves their buffers (class weights)
            self.criteria = HeadDict(tap_criteria)
        self._progress = 0
        self.register_buffer(
            "_weight_values", torch.zeros(len(self.taps), dtype=torch.float32), persistent=False
        )
        self._refresh_weights()
        self._unwrapped = False

    # construction -------------------------------------------------------------------------

    def _build_heads(
        self, resolved: Mapping[str, tuple[nn.Module, Tap]], example_input: Any
    ) -> dict[str, nn.Module]:
        uses: dict[int, int] = {}
        for tap in self.taps.values():
            if isinstance(tap.head, nn.Module):
                uses[id(tap.head)] = uses.get(id(tap.head), 0) + 1
        need = [
            n
            for n, t in self.taps.items()
            if t.head is not None and not isinstance(t.head, nn.Module)
        ]
        shapes: dict[str, torch.Size] = {}
        if example_input is not None and need:
            records = dry_run(self.model, self._capture, example_input)
            for n in need:
                if records.get(n):
                    shapes[n] = records[n][0].tensor.shape
        self._in_channels: dict[str, int] = {}
        heads: dict[str, nn.Module] = {}
        for name, tap in self.taps.items():
            if tap.head is None:
                raise ValueError(
                    f"tap {name!r} has no head; pass head= (e.g. deepsup.heads.seg(num_classes)) "
                    "or Tap(head=...)"
                )
            if isinstance(tap.head, nn.Module):
                heads[name] = copy.deepcopy(tap.head) if uses[id(tap.head)] > 1 else tap.head
                continue
            if not callable(tap.head):
                raise TypeError(
                    f"tap {name!r}: head must be a factory in_channels -> nn.Module or an "
                    f"nn.Module (got {type(tap.head).__name__})"
                )
            layout = getattr(tap.head, "kwargs", {}).get("layout", "NCHW")
            channels = tap.in_channels
            if channels is None and name in shapes:
                shape = shapes[name]
                channels = int(shape[channel_dim(len(shape), layout)]) if len(shape) > 1 else None
            if channels is None:
                channels = from_feature_info(self.model, name)
            if channels is None:
                channels = from_last_layer(resolved[name][0])
            if channels is None:
                ran = "" if example_input is None else " (it did not run in the dry run)"
                raise ChannelInferenceError(
                    f"cannot infer the channels of tap {name!r} "
                    f"({type(resolved[name][0]).__name__}){ran}; pass example_input= to "
                    "DeepSupervision for a dry run, or Tap(in_channels=...)"
                )
            self._in_channels[name] = channels
            built = tap.head(channels)
            if not isinstance(built, nn.Module):
                raise TypeError(
                    f"tap {name!r}: the head factory returned {type(built).__name__}, "
                    "not an nn.Module"
                )
            heads[name] = built
        return heads

    # weights and progress -------------------------------------------------------------------

    def _refresh_weights(self) -> None:
        values = [self._schedule(n)(self._progress) for n in self.taps]
        with torch.no_grad():
            self._weight_values.copy_(torch.tensor(values, dtype=torch.float32))

    def _schedule(self, name: str) -> Schedule:
        weight = self.taps[name].weight
        assert isinstance(weight, Schedule)  # as_schedule at construction
        return weight

    @property
    def progress(self) -> int:
        """The training progress that the weight schedules read (saved in ``state_dict``)."""
        return self._progress

    @progress.setter
    def progress(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"progress must be an int >= 0 (got {value!r})")
        self._progress = value
        self._refresh_weights()

    def step(self, n: int = 1) -> None:
        """Advance the weight schedules by ``n`` (call once per iteration, or per epoch).

        Example:
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, heads, schedules
            >>> sup = DeepSupervision(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
            ...     {"0": schedules.LinearDecay(1.0, total=4)}, head=heads.classification(2))
            >>> sup.step(); sup.weights
            {'0': 0.75}
        """
        self.progress = self._progress + n

    @property
    def weights(self) -> dict[str, float]:
        """The current weight of each tap."""
        return {n: self._schedule(n)(self._progress) for n in self.taps}

    def get_extra_state(self) -> torch.Tensor:
        """The progress, saved as ``_extra_state`` (a tensor, so every exporter copes)."""
        return torch.tensor(self._progress, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Restore the progress from ``_extra_state`` (a tensor, or ``{"progress": int}``)."""
        if isinstance(state, Mapping) and "progress" in state:
            state = state["progress"]
        if isinstance(state, torch.Tensor) and state.numel() == 1:
            state = state.item()
        if isinstance(state, bool) or not isinstance(state, int):
            raise ValueError(
                "a DeepSupervision checkpoint's _extra_state must be the progress, an int "
                f"tensor (got {state!r})"
            )
        self.progress = state

    # forward -----------------------------------------------------------------------------

    def forward(self, *args: Any, target: Any = None, **kwargs: Any) -> Any:
        """Eval: ``model(*args, **kwargs)``. Training: ``(output, aux)``; see the class docs."""
        if not self.training:
            return self.model(*args, **kwargs)
        if self._unwrapped:
            self._raise_unwrapped()
        if target is None and any(t.criterion is not None for t in self.taps.values()):
            raise TargetError(
                "a training forward needs target= to compute the aux losses (got none); call "
                "sup(x, target=y), or build the wrapper with criterion=None to get the heads' "
                "predictions, or call sup.eval() for inference"
            )
        output, captured = self._captured_forward(args, kwargs)
        return output, self._aux(captured, target, output)

    def _captured_forward(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[Any, dict[str, list[torch.Tensor]]]:
        """The model's output and each tap's checked captures, from one windowed forward."""
        grad_enabled = torch.is_grad_enabled()
        with self._capture.window() as records:
            output = self.model(*args, **kwargs)
            captured = {
                name: check_records(
                    name,
                    records.get(name, []),
                    calls=str(tap.calls),
                    detach=tap.detach,
                    grad_enabled=grad_enabled,
                )
                for name, tap in self.taps.items()
            }
        return output, captured

    def _aux(self, captured: dict[str, list[torch.Tensor]], target: Any, output: Any) -> AuxLosses:
        losses: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        for i, (name, tap) in enumerate(self.taps.items()):
            head = self.heads[name]
            preds = [self._run_head(name, tap, head, f) for f in captured[name]]
            if tap.criterion is None:
                losses[name] = raw[name] = preds if tap.calls == "all" else preds[0]
                continue
            tap_target = self._target_for(name, target)
            values = [self._loss(name, tap, p, tap_target, output) for p in preds]
            loss = values[0] if len(values) == 1 else torch.stack(values).mean()
            # detached: a logging view. Keeping it in the graph costs a compiled train step an
            # extra output that needs grad (measured: 1.13x time, +23% peak memory; see
            # docs/benchmarks.md). `criterion=None` gives the undetached predictions.
            raw[name] = loss.detach()
            losses[name] = loss * self._weight_values[i]
        return AuxLosses(losses, raw=raw)

    def _run_head(self, name: str, tap: Tap, head: nn.Module, feat: torch.Tensor) -> Any:
        expected = self._in_channels.get(name)
        if expected is not None and feat.dim() > 1:
            layout = getattr(tap.head, "kwargs", {}).get("layout", "NCHW")
            got = feat.shape[channel_dim(feat.dim(), layout)]
            if got != expected:
                raise ChannelInferenceError(
                    f"tap {name!r}: its head was built for {expected} channels but the captured "
                    f"output has shape {tuple(feat.shape)}; pass example_input= for an exact "
                    "dry run, or Tap(in_channels=...)"
                )
        try:
            return head(feat)
        except DeepSupError:
            raise
        except Exception as err:
            raise _with_context(
                err,
                f"in the head of tap {name!r} (input shape {tuple(feat.shape)}, "
                f"dtype {feat.dtype})",
            ) from err

    def _target_for(self, name: str, target: Any) -> Any:
        if isinstance(target, Mapping):
            if name not in target:
                raise TargetError(
                    f"target= is a dict without an entry for tap {name!r} (keys "
                    f"{sorted(target)}); give every tap a target"
                )
            return target[name]
        return target

    def _loss(self, name: str, tap: Tap, pred: Any, target: Any, output: Any) -> torch.Tensor:
        criterion = tap.criterion
        assert criterion is not None
        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
            pred, target = reconcile(
                pred, target, resize=tap.resize, align_corners=bool(tap.align_corners), tap=name
            )
        extra = {}  # the teacher protocol of deepsup.losses: the model's output, detached
        if wants_teacher(criterion):
            align = bool(tap.align_corners)
            extra["teacher"] = teacher_for(output, pred, align_corners=align, tap=name)
        try:
            loss = criterion(pred, target, **extra)
        except DeepSupError:
            raise
        except Exception as err:
            shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            tshape = (
                tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            )
            raise _with_context(
                err,
                f"in the criterion of tap {name!r} (prediction {shape}, target {tshape})",
            ) from err
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"tap {name!r}: the criterion returned {type(loss).__name__}, not a tensor"
            )
        return loss

    def exits(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Every exit in one forward: ``{tap: prediction, ..., "output": model output}``.

        Eval mode: under ``torch.no_grad()``; training: with gradient. See
        :func:`deepsup.exits.all_exits`.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, heads
            >>> sup = DeepSupervision(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "0",
            ...                       head=heads.classification(2)).eval()
            >>> sorted(sup.exits(torch.randn(3, 4)))
            ['0', 'output']
        """
        from .exits import all_exits  # exits.py builds on this module

        return all_exits(self, *args, **kwargs)

    # unwrap and housekeeping ----------------------------------------------------------------

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the model, as it was before wrapping.

        The wrapper cannot train afterwards. Parameters keep their identity, so an optimizer
        over ``sup.model.parameters()`` stays valid.

        Example:
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, heads
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> sup = DeepSupervision(model, "0", head=heads.classification(2))
            >>> sup.unwrap() is model, len(model[0]._forward_hooks)
            (True, 0)
        """
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unwrapped = True
        return self.model

    def _raise_unwrapped(self) -> NoReturn:
        raise RuntimeError(
            "this DeepSupervision was unwrapped (its hooks are removed); train the model "
            "through a new DeepSupervision(model, ...)"
        )

    def extra_repr(self) -> str:
        taps = ", ".join(f"{n!r}: {t.weight!r}" for n, t in self.taps.items())
        return f"taps={{{taps}}}, progress={self._progress}"

    def __prepare_scriptable__(self) -> NoReturn:
        raise DeepSupScriptError(
            "torch.jit.script cannot compile DeepSupervision (its Python forward hooks and "
            "capture state are not TorchScript); script the plain model instead: "
            "torch.jit.script(sup.unwrap()), or use torch.jit.trace / torch.export on the eval "
            "wrapper"
        )
