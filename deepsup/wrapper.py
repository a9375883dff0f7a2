"""``DeepSupervision``: auxiliary heads and losses on named intermediate modules of any model."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import torch
from torch import nn

from ._capture import Capture, TapHook, as_call, check_records, dry_run
from ._channels import check_channels, infer_channels
from ._checks import check_batch, check_head, check_target_key
from ._errors import (
    ConfigError,
    ConfigTypeError,
    DeepSupScriptError,
    DeepSupWarning,
    HeadError,
    TargetError,
    UsageError,
    call_user,
    check_int,
)
from ._resize import Resize, check_interpolation, check_resize, reconcile
from ._taps import (
    Calls,
    TapsArg,
    TapSettings,
    TapsView,
    check_calls,
    check_criterion,
    resolve_taps,
    settle,
)
from .losses import teacher_for, wants_teacher

__all__ = ["AuxLosses", "DeepSupervision", "HeadDict"]

_as_call = as_call  # the name other modules imported before the dry run moved to _capture


class AuxLosses(dict):  # type: ignore[type-arg]
    """``{tap name: weighted aux loss}``, with the unweighted losses in :attr:`raw`.

    ``raw`` holds detached values, for logging; only the weighted losses carry gradient. It is
    optional, so ``type(aux)(pairs)`` rebuilds one (``nn.DataParallel``'s gather, dict
    utilities); the rebuilt one has an empty ``raw``. A tap built with ``criterion=None`` in a
    wrapper where other taps have a criterion maps to its prediction and has no ``raw`` entry
    (a wrapper where no tap has a criterion returns a plain ``dict`` of predictions).

    A plain ``dict`` in every other respect, so ``sum(aux.values())`` is the total aux loss.

    Example:
        >>> import torch
        >>> aux = AuxLosses({"layer3": torch.tensor(0.5)}, raw={"layer3": torch.tensor(1.0)})
        >>> float(sum(aux.values())), float(aux.raw["layer3"])
        (0.5, 1.0)
    """

    def __init__(
        self, losses: Any = (), /, *, raw: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(losses, **kwargs)
        self.raw: dict[str, Any] = dict(raw or {})

    def __reduce__(self) -> Any:  # pickle and copy keep raw
        return (type(self), (dict(self),), {"raw": self.raw})


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
        interpolation: with ``resize="prediction"``, the ``F.interpolate`` mode of the
            upsampling: ``"linear"`` (default: bi/trilinear by the number of spatial dims),
            ``"nearest"`` (MONAI's DynUNet), ``"nearest-exact"``, ``"area"``, ``"bicubic"``. With
            ``resize="target"``, how the target is downsampled: ``"nearest"`` (default),
            ``"nearest-exact"`` (MONAI's ``DeepSupervisionLoss``, nnU-Net v2), ``"soft"`` (the
            fraction of each class per cell, for criteria that take probabilities) or ``"max"``
            (a cell is positive where any pixel is). Taps at the same scale share one
            downsampled target per forward. See ``docs/unet.md``.
        example_input: an input (a tensor, a tuple of positional arguments or a dict of keyword
            arguments) for one dry run at construction (eval mode, no gradient) that infers the
            heads' input channels exactly. Without it, channels come from timm's
            ``feature_info`` or the tapped module's last conv/norm/linear.
        calls: the default of :attr:`Tap.calls` (a module that runs several times per forward).
        clone: the default of :attr:`Tap.clone`.
        target_key: the keyword that carries the target in a training forward. A model whose
            ``forward`` takes a parameter of this name (its own ``target=``) is refused at
            construction, so that the model never silently loses it: pass another name, e.g.
            ``target_key="aux_target"``, and call ``sup(x, target=t, aux_target=y)``.

    Raises:
        TapNotFoundError: a tap names no submodule (the message lists close matches).
        ChannelInferenceError: a head's input channels cannot be inferred.
        ConfigError, ConfigTypeError: another argument is wrong (see ``deepsup._errors``).

    Shape:
        Training: ``sup(*args, target=target, **kwargs)`` returns ``(output, aux)``, ``output``
        exactly what ``model(*args, **kwargs)`` returns and ``aux`` an :class:`AuxLosses`
        ``{tap: weight * criterion(prediction, target)}`` (with ``.raw`` unweighted and
        detached, for logging), or a plain dict
        ``{tap: prediction}`` when ``criterion=None``. The weight is applied exactly, as
        ``weight * loss`` in the loss's dtype would; ``sup.step()`` may run between the forward
        and its backward (the backward uses the forward's weight). ``target`` may also be a dict
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
        interpolation: str | None = None,
        example_input: Any = None,
        calls: Calls = "error",
        clone: bool = False,
        target_key: str = "target",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be an nn.Module (got {type(model).__name__})")
        if isinstance(model, DeepSupervision):
            raise ConfigTypeError(
                "model is already a DeepSupervision; add the taps to one wrapper instead"
            )
        check_calls(calls)
        check_resize(resize)
        if resize is None:
            check_interpolation(resize, interpolation)
        check_criterion(criterion, "")
        check_head(head, "")
        self._target_key = check_target_key(model, target_key)
        self.model = model
        self.criterion = criterion

        resolved = resolve_taps(model, taps)
        self._settings: dict[str, TapSettings] = {}
        specs: dict[str, Any] = {}
        for name, (_, tap) in resolved.items():
            self._settings[name], specs[name] = settle(
                tap,
                head=head,
                criterion=criterion,
                resize=resize,
                align_corners=align_corners,
                calls=calls,
                clone=clone,
                interpolation=interpolation,
            )
            check_head(specs[name], f"tap {name!r}: ")

        self._capture = Capture()
        self._handles = []
        for name, (module, _) in resolved.items():
            s = self._settings[name]
            self._handles.append(
                module.register_forward_hook(TapHook(self._capture, name, s.select, s.clone))
            )

        modules = {n: m for n, (m, _) in resolved.items()}
        # the factories are dropped once the heads are built: a lambda factory still pickles
        self.heads = HeadDict(self._build_heads(modules, specs, example_input))
        self.taps = TapsView({n: s.as_tap(self.heads[n]) for n, s in self._settings.items()})
        tap_criteria = {
            n: s.criterion
            for n, s in self._settings.items()
            if isinstance(s.criterion, nn.Module) and s.criterion is not criterion
        }
        if tap_criteria:  # registered so that .to(device) moves their buffers (class weights)
            self.criteria = HeadDict(tap_criteria)
        self._progress = 0
        # float64, and kept float64 by _apply: every float weight is exact in it (see _weighted)
        self.register_buffer(
            "_weight_values",
            torch.zeros(len(self._settings), dtype=torch.float64),
            persistent=False,
        )
        self._refresh_weights()
        self._unwrapped = False

    # construction -------------------------------------------------------------------------

    def _build_heads(
        self, modules: Mapping[str, nn.Module], specs: Mapping[str, Any], example_input: Any
    ) -> dict[str, nn.Module]:
        uses: dict[int, int] = {}
        for spec in specs.values():
            if isinstance(spec, nn.Module):
                uses[id(spec)] = uses.get(id(spec), 0) + 1
        need = [
            n for n, spec in specs.items() if spec is not None and not isinstance(spec, nn.Module)
        ]
        shapes: dict[str, torch.Size] = {}
        if example_input is not None and need:
            records = dry_run(self.model, example_input, self._capture.window())
            for n in need:
                if records.get(n):
                    shapes[n] = records[n][0].tensor.shape
            check_batch(example_input, shapes)
        self._in_channels: dict[str, int] = {}
        heads: dict[str, nn.Module] = {}
        for name, spec in specs.items():
            s = self._settings[name]
            if spec is None:
                raise ConfigError(
                    f"tap {name!r} has no head; pass head= (e.g. deepsup.heads.seg(num_classes)) "
                    "or Tap(head=...)"
                )
            if isinstance(spec, nn.Module):
                if s.in_channels is not None:
                    warnings.warn(
                        f"tap {name!r}: Tap(in_channels={s.in_channels}) has no effect with a "
                        "ready head module (it is used as given)",
                        DeepSupWarning,
                        stacklevel=3,
                    )
                heads[name] = copy.deepcopy(spec) if uses[id(spec)] > 1 else spec
                continue
            channels = infer_channels(
                self.model,
                name,
                modules[name],
                layout=s.layout,
                given=s.in_channels,
                shape=shapes.get(name),
                dry_run=example_input is not None,
            )
            self._in_channels[name] = channels
            built = spec(channels)
            if not isinstance(built, nn.Module):
                hint = (
                    " (a factory of factories: was a head maker passed uncalled?)"
                    if callable(built)
                    else ""
                )
                raise ConfigTypeError(
                    f"tap {name!r}: the head factory returned {type(built).__name__}, not an "
                    f"nn.Module{hint}; head= takes a callable in_channels -> nn.Module such as "
                    "deepsup.heads.seg(num_classes)"
                )
            heads[name] = built
        return heads

    # weights and progress -------------------------------------------------------------------

    def _weight_list(self, progress: int) -> list[float]:
        values = []
        for name, s in self._settings.items():
            w = s.weight(progress)
            ok = isinstance(w, (int, float)) and not isinstance(w, bool)
            if not ok or not math.isfinite(w) or w < 0:
                raise ConfigError(
                    f"tap {name!r}: the schedule {s.weight!r} gave the weight {w!r} at progress "
                    f"{progress}; a weight must be a finite number >= 0. Fix the schedule's "
                    "__call__ (deepsup.schedules.Schedule)"
                )
            values.append(float(w))
        return values

    def _refresh_weights(self) -> None:
        values = self._weight_list(self._progress)
        with torch.no_grad():  # in place: a compiled forward reads the same buffer (no recompile)
            self._weight_values.copy_(torch.tensor(values, dtype=torch.float64))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """As ``nn.Module._apply``, but the weights stay float64 and exact (``.to(bfloat16)``)."""
        out = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        device = self._weight_values.device
        self._weight_values = torch.tensor(
            self._weight_list(self._progress), dtype=torch.float64, device=device
        )
        return out

    @property
    def progress(self) -> int:
        """The training progress that the weight schedules read (saved in ``state_dict``)."""
        return self._progress

    @progress.setter
    def progress(self, value: int) -> None:
        value = check_int("progress", value, minimum=0)
        self._weight_list(value)  # checked before anything changes
        self._progress = value
        self._refresh_weights()

    def step(self, n: int = 1) -> None:
        """Advance the weight schedules by ``n`` (call once per iteration, or per epoch).

        Legal between a forward and its backward: the backward uses the forward's weight.

        Raises:
            ConfigError: a schedule gives a weight that is not a finite number >= 0.

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
        return dict(zip(self._settings, self._weight_list(self._progress)))

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
            raise ConfigError(
                "a DeepSupervision checkpoint's _extra_state must be the progress, an int "
                f"tensor (got {state!r})"
            )
        self.progress = state

    # forward -----------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Eval: ``model(*args, **kwargs)``. Training: ``(output, aux)``; see the class docs."""
        target = kwargs.pop(self._target_key, None)
        if not self.training:
            return self.model(*args, **kwargs)
        self._check_can_train(target)
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
                    calls=s.calls,
                    detach=s.detach,
                    grad_enabled=grad_enabled,
                )
                for name, s in self._settings.items()
            }
        return output, captured

    def _check_usable(self) -> None:
        """The checks of every forward that runs the heads (training, ``exits()``)."""
        if self._unwrapped:
            raise UsageError(
                "this DeepSupervision was unwrapped (its hooks are removed); train the model "
                "through a new DeepSupervision(model, ...)"
            )
        # (eager only: Dynamo cannot trace the check, and compiled code under
        # inference_mode fails on its own)
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            raise UsageError(
                "a training forward under torch.inference_mode(): the aux heads need autograd "
                "tensors (and BatchNorm would update its statistics). Call sup.eval() for "
                "inference (the wrapper is then the model), or use torch.no_grad() for a "
                "training-mode forward without gradient"
            )

    def _check_can_train(self, target: Any) -> None:
        self._check_usable()
        with_criterion = any(s.criterion is not None for s in self._settings.values())
        key = self._target_key
        if target is None and with_criterion:
            raise TargetError(
                f"a training forward needs {key}= to compute the aux losses (got none); call "
                f"sup(x, {key}=y), or build the wrapper with criterion=None to get the heads' "
                "predictions, or call sup.eval() for inference"
            )
        if target is not None and not with_criterion:
            warnings.warn(
                f"{key}= has no effect: no tap has a criterion, so the training forward returns "
                "the heads' predictions; drop it, or pass criterion=",
                DeepSupWarning,
                stacklevel=4,
            )

    def _aux(
        self, captured: dict[str, list[torch.Tensor]], target: Any, output: Any
    ) -> dict[str, Any]:
        losses: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        pyramid: dict[Any, torch.Tensor] = {}  # this forward's downsampled targets, shared
        for i, (name, s) in enumerate(self._settings.items()):
            head = self.heads[name]
            preds = [run_head(name, s, head, f, self._in_channels) for f in captured[name]]
            if s.criterion is None:
                losses[name] = preds if s.calls == "all" else preds[0]
                continue
            tap_target = self._target_for(name, target)
            values = [self._loss(name, s, p, tap_target, output, pyramid) for p in preds]
            loss = values[0] if len(values) == 1 else torch.stack(values).mean()
            # detached: a logging view. Keeping it in the graph costs a compiled train step an
            # extra output that needs grad (measured: 1.13x time, +23% peak memory; see
            # docs/benchmarks.md). `criterion=None` gives the undetached predictions.
            raw[name] = loss.detach()
            losses[name] = _weighted(loss, self._weight_values[i])
        if not raw:  # no tap has a criterion: predictions, not losses
            return losses
        return AuxLosses(losses, raw=raw)

    def _target_for(self, name: str, target: Any) -> Any:
        if isinstance(target, Mapping):
            if name not in target:
                raise TargetError(
                    f"{self._target_key}= is a dict without an entry for tap {name!r} (keys "
                    f"{sorted(target)}); give every tap a target"
                )
            return target[name]
        return target

    def _loss(
        self,
        name: str,
        s: TapSettings,
        pred: Any,
        target: Any,
        output: Any,
        pyramid: dict[Any, torch.Tensor],
    ) -> torch.Tensor:
        criterion = s.criterion
        if criterion is None:  # pragma: no cover - _aux returns predictions for these taps
            raise ConfigError(f"tap {name!r} has no criterion")
        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
            pred, target = reconcile(
                pred,
                target,
                resize=s.resize,
                align_corners=s.align_corners,
                tap=name,
                layout=s.pred_layout,
                ignore_index=s.ignore_index,
                interpolation=s.interpolation,
                pyramid=pyramid,
            )
        # (after reconcile: a "soft" target is a float (B, K, *S) map, not labels)
        labels = (
            isinstance(pred, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and not target.is_floating_point()
            and target.dim() == pred.dim() - 1
        )
        extra = {}  # the teacher protocol of deepsup.losses: the model's output, detached
        if wants_teacher(criterion):
            extra["teacher"] = teacher_for(
                output, pred, align_corners=s.align_corners, tap=name, layout=s.pred_layout
            )
        loss = call_user(
            criterion, pred, target, note=lambda: _criterion_note(name, pred, target), **extra
        )
        if not isinstance(loss, torch.Tensor):
            raise ConfigTypeError(
                f"tap {name!r}: the criterion returned {type(loss).__name__}, not a tensor"
            )
        if labels and s.ignore_index is not None:
            # no valid label in the batch: a mean over nothing is NaN; give 0 (still in the
            # graph, so every head parameter gets a gradient, as DDP needs). No host sync.
            loss = torch.where((target != s.ignore_index).any(), loss, 0.0)
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

    def extra_repr(self) -> str:
        taps = ", ".join(f"{n!r}: {s.weight!r}" for n, s in self._settings.items())
        return f"taps={{{taps}}}, progress={self._progress}"

    def __prepare_scriptable__(self) -> NoReturn:
        raise DeepSupScriptError(
            "torch.jit.script cannot compile DeepSupervision (its Python forward hooks and "
            "capture state are not TorchScript); script the plain model instead: "
            "torch.jit.script(sup.unwrap()), or use torch.jit.trace / torch.export on the eval "
            "wrapper"
        )


def run_head(
    name: str, s: TapSettings, head: nn.Module, feat: torch.Tensor, in_channels: Mapping[str, int]
) -> Any:
    """The head of tap ``name`` on ``feat``, checked (channels, in-place change of its input);
    a user's exception is re-raised with the tap in a note. Shared by the training forward,
    ``exits()`` and :class:`~deepsup.EarlyExit`."""
    check_channels(name, feat, in_channels, s.layout)
    # a head that changes its input in place would change the model's output (a tap on the
    # last module) or a tensor autograd saved (backward fails far from here): checked below
    # (inference tensors have no version counter: EarlyExit under inference_mode)
    skip = s.clone or torch.compiler.is_compiling() or feat.is_inference()
    version = -1 if skip else feat._version
    pred = call_user(
        head,
        feat,
        note=lambda: (
            f"deepsup: raised in the head of tap {name!r} (input shape "
            f"{tuple(feat.shape)}, dtype {feat.dtype})"
        ),
    )
    if version >= 0 and feat._version != version:
        raise HeadError(
            f"tap {name!r}: its head changed its input in place (an in-place op such as "
            "ReLU(inplace=True) at the head's start), which would change the model's output "
            "or a tensor autograd saved for backward. Pass Tap(clone=True) to give the head "
            "a copy, or use a head that does not modify its input"
        )
    return pred


def _criterion_note(name: str, pred: Any, target: Any) -> str:
    def shape(t: Any) -> Any:
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    return (
        f"deepsup: raised in the criterion of tap {name!r} (prediction {shape(pred)}, "
        f"target {shape(target)})"
    )


def _weighted(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``loss * weight`` exactly as ``loss * float(weight)`` would compute it, from a float64
    0-dim buffer entry: in the loss's dtype, via float32 for half and bfloat16 (PyTorch's rule
    for Python scalars). The weight is a copy, so ``sup.step()`` before backward is legal."""
    if loss.dtype in (torch.float16, torch.bfloat16):
        return (loss.float() * weight.float()).to(loss.dtype)
    return loss * weight.to(dtype=loss.dtype, copy=True)
