"""``DeepSupervision``: auxiliary heads and losses on named intermediate modules of any model."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, NoReturn

import torch
from torch import nn

from . import functional as DF
from ._build import HeadDict, build_heads, check_batch, need_layout, run_head
from ._capture import Capture, TapHook, captured, dry_run
from ._checks import check_int
from ._config import (
    OUTPUT,
    Calls,
    TapsArg,
    TapSettings,
    TapsView,
    check_calls,
    check_criterion,
    check_head,
    check_interpolation,
    check_resize,
    check_target_key,
    settle,
)
from ._names import resolve_taps
from ._weights import weight_tensor, weight_values
from .errors import (
    ConfigError,
    ConfigTypeError,
    DeepSupScriptError,
    DeepSupWarning,
    EarlyExitError,
    TargetError,
    UsageError,
)
from .functional import Resize

__all__ = ["AuxLosses", "DeepSupervision", "HeadDict"]


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


class DeepSupervision(nn.Module):
    """Deep supervision for an unmodified model: aux heads and losses on named modules.

    Forward hooks registered once, at construction, capture the outputs of the tapped modules
    during a training forward; after the model returns, each tap's head runs on its capture and
    :func:`deepsup.functional.aux_loss` compares the prediction with the target. In eval mode
    the wrapper *is* the model: ``sup(x)`` returns ``model(x)``, bit for bit, and no head runs.

    Args:
        model: any ``nn.Module``; its code and parameters are not changed.
        taps: a module name, a list of names, or a dict mapping names to a weight (float or
            :mod:`~deepsup.schedules` schedule) or a :class:`Tap`. Names are those of
            ``model.named_modules()``; glob patterns match several (``*`` within one name
            component, ``**`` across dots). A bare name gets weight 0.4. An empty dict is the
            plain model (a training forward returns ``(output, {})``), for baselines.
        head: a head factory ``in_channels -> nn.Module`` (see :mod:`deepsup.heads`; a class
            whose constructor takes the channel count is one) or a ready module, for the taps
            whose :class:`Tap` does not set one. A ready module used by several taps is
            deep-copied per tap.
        criterion: ``criterion(prediction, target) -> loss`` for every tap; ``None`` makes a
            training forward return the heads' predictions instead of losses. PyTorch's
            class-axis losses get the classes at dim 1 whatever the layout
            (:func:`deepsup.functional.criterion_layout`).
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
            arguments) for one dry run at construction (eval mode, no gradient) that gives each
            tap's output shape: the layout and channels are then exact. Without it they come
            from the tapped module's layers and timm's ``feature_info``.
        calls: the default of :attr:`Tap.calls` (a module that runs several times per forward).
        clone: the default of :attr:`Tap.clone`.
        target_key: the keyword that carries the target in a training forward. A model whose
            ``forward`` takes a parameter of this name (its own ``target=``) is refused at
            construction, so that the model never silently loses it: pass another name, e.g.
            ``target_key="aux_target"``, and call ``sup(x, target=t, aux_target=y)``.

    Raises:
        TapNotFoundError: a tap names no submodule (the message lists close matches).
        ChannelInferenceError: a head's input channels cannot be inferred.
        ConfigError, ConfigTypeError: another argument is wrong (see :mod:`deepsup.errors`).

    Shape:
        Training: ``sup(*args, target=target, **kwargs)`` returns ``(output, aux)``, ``output``
        exactly what ``model(*args, **kwargs)`` returns and ``aux`` an :class:`AuxLosses`
        ``{tap: weight * criterion(prediction, target)}`` (with ``.raw`` unweighted and
        detached, for logging), or a plain dict ``{tap: prediction}`` when ``criterion=None``.
        The weight is applied exactly, as ``weight * loss`` in the loss's dtype would;
        ``sup.step()`` may run between the forward and its backward (the backward uses the
        forward's weight). A tap whose weight is 0 and whose head has no parameters of its
        own (:func:`deepsup.heads.reuse`) runs no head: its entry is a constant 0 without
        graph and it has no ``raw`` entry (DDP-safe: the reused parameters get the main loss's
        gradient). ``target`` may also be a dict ``{tap: target}``. Eval:
        ``sup(*args, **kwargs)`` returns ``model(*args, **kwargs)``; ``target=`` is accepted
        and ignored.

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
        settings: dict[str, TapSettings] = {}
        specs: dict[str, Any] = {}
        for name, (_, tap) in resolved.items():
            settings[name], specs[name] = settle(
                name,
                tap,
                head=head,
                criterion=criterion,
                resize=resize,
                align_corners=align_corners,
                calls=calls,
                clone=clone,
                interpolation=interpolation,
            )

        self._capture = Capture()
        self._handles = [
            module.register_forward_hook(
                TapHook(self._capture, name, settings[name].select, settings[name].clone)
            )
            for name, (module, _) in resolved.items()
        ]
        shapes: dict[str, torch.Size] = {}
        self._calls_seen: dict[str, int] = {}  # per eval forward, from the dry run
        if example_input is not None and settings:
            records = dry_run(model, example_input, self._capture.window())
            shapes = {n: r[0].tensor.shape for n, r in records.items() if r}
            self._calls_seen = {n: len(records.get(n, [])) for n in settings}
            check_batch(example_input, shapes)
        modules = {n: m for n, (m, _) in resolved.items()}
        built = build_heads(model, modules, settings, specs, shapes)
        self._settings = built.settings
        self._in_channels = built.channels
        # the factories are dropped once the heads are built: a lambda factory still pickles
        self.heads = HeadDict(built.heads)
        self.taps = TapsView({n: s.as_tap(self.heads[n]) for n, s in self._settings.items()})
        tap_criteria = {
            n: s.criterion
            for n, s in self._settings.items()
            if isinstance(s.criterion, nn.Module) and s.criterion is not criterion
        }
        if tap_criteria:  # registered so that .to(device) moves their buffers (class weights)
            self.criteria = HeadDict(tap_criteria)
        self._progress = 0
        # float64, and kept float64 by _apply: every float weight is exact in it
        self.register_buffer("_weight_values", weight_tensor(self._settings, 0), persistent=False)
        # heads without parameters of their own (heads.reuse): skipped while their weight is 0
        self._paramless = frozenset(
            n for n in self._settings if next(self.heads[n].parameters(), None) is None
        )
        self._off = self._skipped(0)
        self._unwrapped = False

    # weights and progress -------------------------------------------------------------------

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """As ``nn.Module._apply``, but the weights stay float64 and exact (``.to(bfloat16)``)."""
        out = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        device = self._weight_values.device
        self._weight_values = weight_tensor(self._settings, self._progress, device)
        return out

    @property
    def progress(self) -> int:
        """The training progress that the weight schedules read (saved in ``state_dict``)."""
        return self._progress

    @progress.setter
    def progress(self, value: int) -> None:
        value = check_int("progress", value, minimum=0)
        values = weight_tensor(self._settings, value)  # checked before anything changes
        self._progress = value
        self._off = self._skipped(value)
        with torch.no_grad():  # in place: a compiled forward reads the same buffer (no recompile)
            self._weight_values.copy_(values)

    def _skipped(self, progress: int) -> frozenset[str]:
        """The taps whose head does not run at ``progress``: weight 0 and no parameters of
        their own, so no rank of ``DistributedDataParallel`` waits for a gradient of theirs
        (a head with parameters still runs, its loss multiplied by 0)."""
        values = weight_values(self._settings, progress)
        return frozenset(n for n, w in zip(self._settings, values) if w == 0) & self._paramless

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
        return dict(zip(self._settings, weight_values(self._settings, self._progress)))

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
        output, feats = self._captured_forward(args, kwargs)
        return output, self._aux(feats, target, output)

    def _captured_forward(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[Any, dict[str, list[torch.Tensor]]]:
        """The model's output and each tap's checked captures, from one windowed forward."""
        grad_enabled = torch.is_grad_enabled()
        forward = "training forward" if self.training else "forward"
        with self._capture.window() as records:
            output = self.model(*args, **kwargs)
            feats = {
                name: captured(
                    name,
                    records.get(name, []),
                    calls=s.calls,
                    detach=s.detach,
                    grad_enabled=grad_enabled,
                    forward=forward,
                )
                for name, s in self._settings.items()
            }
        return output, feats

    def _predictions(self, name: str, feats: list[torch.Tensor]) -> list[Any]:
        s, head = self._settings[name], self.heads[name]
        return [run_head(name, s, head, f, self._in_channels) for f in feats]

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
        if target is not None and not with_criterion and self._settings:
            warnings.warn(
                f"{key}= has no effect: no tap has a criterion, so the training forward returns "
                "the heads' predictions; drop it, or pass criterion=",
                DeepSupWarning,
                stacklevel=4,
            )

    def _aux(self, feats: dict[str, list[torch.Tensor]], target: Any, output: Any) -> Any:
        losses: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        pyramid: dict[Any, torch.Tensor] = {}  # this forward's downsampled targets, shared
        for i, (name, s) in enumerate(self._settings.items()):
            if name in self._off and s.criterion is not None:
                # weight 0, a head without parameters (heads.reuse): no head runs, no graph
                losses[name] = torch.zeros((), device=self._weight_values.device)
                continue
            preds = self._predictions(name, feats[name])
            if s.criterion is None:
                losses[name] = preds if s.calls == "all" else preds[0]
                continue
            tap_target = self._target_for(name, target)
            values = [
                DF.aux_loss(
                    p,
                    tap_target,
                    s.criterion,
                    layout=self._pred_layout(name, p),
                    resize=s.resize,
                    interpolation=s.interpolation,
                    align_corners=s.align_corners,
                    ignore_index=s.ignore_index,
                    teacher=output,
                    pyramid=pyramid,
                    tap=name,
                )
                for p in preds
            ]
            loss = values[0] if len(values) == 1 else torch.stack(values).mean()
            # detached: a logging view. Keeping it in the graph costs a compiled train step an
            # extra output that needs grad (measured: 1.13x time, +23% peak memory; see
            # docs/benchmarks.md). `criterion=None` gives the undetached predictions.
            raw[name] = loss.detach()
            losses[name] = DF.weighted(loss, self._weight_values[i])
        if not raw and self._settings:  # no tap has a criterion: predictions, not losses
            return losses
        return AuxLosses(losses, raw=raw)

    def _pred_layout(self, name: str, pred: Any) -> Any:
        if not isinstance(pred, torch.Tensor):
            return self._settings[name].pred_layout or "NCHW"
        return need_layout(name, self._settings[name].pred_layout, pred, "prediction")

    def _target_for(self, name: str, target: Any) -> Any:
        if isinstance(target, Mapping):
            if name not in target:
                raise TargetError(
                    f"{self._target_key}= is a dict without an entry for tap {name!r} (keys "
                    f"{sorted(target)}); give every tap a target"
                )
            return target[name]
        return target

    def exits(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Every exit in one forward: ``{tap: prediction, ..., "output": model output}``.

        Eval mode: under ``torch.no_grad()``; training: with gradient (BatchNorm statistics
        update, dropout is on). A tap with ``calls="all"`` gives a list of predictions; the
        others the call their ``calls`` rule picks. A ``target=`` is ignored, as in eval.

        Raises:
            CaptureError: a tap did not run, or ran several times with ``calls="error"``.
            UsageError: the wrapper was unwrapped, or the call runs under
                ``torch.inference_mode()`` (use ``torch.no_grad()``).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, heads
            >>> sup = DeepSupervision(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "0",
            ...                       head=heads.classification(2)).eval()
            >>> {k: tuple(v.shape) for k, v in sup.exits(torch.randn(3, 4)).items()}
            {'0': (3, 2), 'output': (3, 2)}
        """
        kwargs.pop(self._target_key, None)
        if not self.training and torch.is_inference_mode_enabled():
            raise UsageError(
                "sup.exits() under torch.inference_mode(): the tap hooks check their captures' "
                "version counters, which inference tensors lack. Use torch.no_grad() (eval-mode "
                "exits() already runs under it), or EarlyExit for inference"
            )
        self._check_usable()
        if OUTPUT in self._settings:
            raise EarlyExitError(
                f"a tap is named {OUTPUT!r}, the key exits() keeps for the model's output; tap "
                "another module (a parent or child of it)"
            )
        with torch.no_grad() if not self.training else nullcontext():
            output, feats = self._captured_forward(args, kwargs)
            result: dict[str, Any] = {}
            for name, s in self._settings.items():
                preds = self._predictions(name, feats[name])
                result[name] = preds if s.calls == "all" else preds[0]
        result[OUTPUT] = output
        return result

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
