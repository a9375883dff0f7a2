"""Self-speculative decoding from an early exit: the first layers draft, the full model verifies.

LayerSkip's decoding (Elhoushi et al., 2024) on an unmodified causal LM: a forward hook on the
exit's layer stops the model's forward there, the exit's head (:func:`deepsup.heads.reuse`: the
model's own final norm and ``lm_head``) gives the draft token, and one forward of the full model
over the drafted tokens checks them all. Greedy output equals the model's own greedy decoding.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from ._capture import select_tensor
from ._checks import check_int
from .errors import ConfigError, UsageError
from .wrapper import DeepSupervision

__all__ = ["SelfSpeculativeDecoder", "SpeculativeStats"]


class _Drafted(BaseException):
    """Raised by the exit hook to stop a draft forward after the exit's layer."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _StopHook:
    """The exit layer's forward hook: inside a draft forward, stop with its output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.drafting = False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.drafting:
            raise _Drafted(select_tensor(output, None, self.name))
        return None


def _cache_keyword(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cut_cache(cache: Any, length: int) -> None:
    """Cut a Hugging Face ``DynamicCache`` back to ``length`` tokens, layer by layer (a layer
    that is shorter, a deeper layer a stopped draft forward did not reach, is left as is)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4.x: crop(max_length)
        cache.crop(length)
        return
    for layer in layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


@dataclasses.dataclass
class SpeculativeStats:
    """What one :meth:`SelfSpeculativeDecoder.generate` call did."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance(self) -> float:
        """The fraction of drafted tokens the full model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0


class SelfSpeculativeDecoder:
    """Greedy self-speculative decoding: draft with the layers up to ``exit``, verify with all.

    Each round runs the model's forward up to the exit's layer (stopped there by a hook) for
    ``draft_tokens`` tokens, one at a time, each through the exit's head; then the full model
    runs once over the drafted tokens and keeps the longest prefix that equals its own greedy
    choice, plus its own next token. The KV cache is the model's (a Hugging Face
    ``DynamicCache``), shared by draft and verify: the draft writes the shared layers' entries,
    and the cache is cut back to the accepted length before each verify and after it. The
    verify recomputes the shared layers of the drafted tokens (reusing their draft entries would
    need a change to the model's forward).

    Args:
        sup: a :class:`DeepSupervision` over a Hugging Face causal LM whose ``exit`` tap has a
            head giving logits ``(B, T, V)`` (:func:`deepsup.heads.reuse`).
        exit: the tap that drafts, e.g. ``"model.layers.3"``.
        draft_tokens: tokens drafted per round.

    Example:
        >>> import torch, transformers
        >>> from deepsup import DeepSupervision, heads
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> sup = DeepSupervision(model, ["model.layers.0"],
        ...                       head=heads.reuse(model.model.norm, model.lm_head)).eval()
        >>> dec = SelfSpeculativeDecoder(sup, exit="model.layers.0")
        >>> dec.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5).shape
        torch.Size([1, 8])
    """

    def __init__(self, sup: DeepSupervision, exit: str, *, draft_tokens: int = 4) -> None:
        if not isinstance(sup, DeepSupervision):
            raise ConfigError(
                f"sup must be a DeepSupervision (got {type(sup).__name__}); wrap the model with "
                "DeepSupervision(model, taps, head=heads.reuse(...)) first"
            )
        if exit not in sup.heads:
            raise ConfigError(
                f"exit {exit!r} is not a tap of the wrapper (taps {list(sup.heads)}); pass one "
                "of them"
            )
        self.sup = sup
        self.exit = exit
        self.draft_tokens = check_int("draft_tokens", draft_tokens)
        self.head = sup.heads[exit]
        self._hook = _StopHook(exit)
        self._handle = sup.model.get_submodule(exit).register_forward_hook(self._hook)
        self.stats = SpeculativeStats()
        self._key = _cache_keyword(sup.model)

    def remove(self) -> None:
        """Remove the exit hook (the wrapper and the model are left as they were)."""
        self._handle.remove()

    def _draft(self, token: torch.Tensor, cache: Any) -> torch.Tensor:
        self._hook.drafting = True
        try:
            self.sup.model(input_ids=token, use_cache=True, **{self._key: cache})
        except _Drafted as stop:
            hidden = stop.hidden
        else:
            raise UsageError(
                f"the exit {self.exit!r} did not run in the draft forward; tap a layer the "
                "model runs on every token"
            )
        finally:
            self._hook.drafting = False
        logits = self.head(hidden[:, -1:])
        return logits[:, -1].argmax(-1, keepdim=True)  # type: ignore[no-any-return]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of ``max_new_tokens`` tokens after ``input_ids`` (one sequence).

        Returns ``(1, T + max_new_tokens)`` ids, equal to
        ``model.generate(input_ids, do_sample=False, max_new_tokens=...)`` without an end
        token; :attr:`stats` holds the drafted and accepted counts.

        Raises:
            UsageError: a batch of more than one sequence, or the model in training mode.
        """
        check_int("max_new_tokens", max_new_tokens)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise UsageError(
                f"generate takes one sequence, input_ids of shape (1, T) (got "
                f"{tuple(input_ids.shape)}); decode the rows one at a time"
            )
        if self.sup.model.training:
            raise UsageError("call sup.eval() before decoding (dropout would change the tokens)")
        model = self.sup.model
        self.stats = stats = SpeculativeStats()
        out = model(input_ids=input_ids, use_cache=True)
        cache = getattr(out, self._key)
        seq = torch.cat([input_ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        end = input_ids.shape[1] + max_new_tokens
        while seq.shape[1] < end:
            done = seq.shape[1] - 1  # tokens in the cache: all but the last
            drafts = [seq[:, -1:]]
            for _ in range(min(self.draft_tokens, end - seq.shape[1])):
                drafts.append(self._draft(drafts[-1], cache))
            cut_cache(cache, done)  # the drafted entries of the shared layers
            block = torch.cat(drafts, dim=1)
            logits = model(input_ids=block, use_cache=True, **{self._key: cache}).logits
            greedy = logits[0].argmax(-1)
            proposed = block[0, 1:]
            matches = (proposed == greedy[: proposed.numel()]).int()
            n = int(matches.cumprod(0).sum())
            stats.drafted += proposed.numel()
            stats.accepted += n
            stats.rounds += 1
            seq = torch.cat([seq, proposed[:n][None], greedy[n : n + 1][None]], dim=1)
            cut_cache(cache, done + 1 + n)
        return seq[:, :end]
