"""Early-exit training of causal LMs: heads.reuse, NextToken, curricula, speculative decoding.

Tiny Hugging Face models built from configs (no downloads): Llama and GPT-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import (
    DeepSupervision,
    LayerDropout,
    SelfSpeculativeDecoder,
    heads,
    losses,
    schedules,
)
from deepsup import functional as DF
from deepsup.errors import ConfigError, ConfigTypeError, TargetError, UsageError

transformers = pytest.importorskip("transformers")

VOCAB = 61


def tiny_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def exit_head(model: nn.Module) -> heads.Reuse:
    if hasattr(model, "transformer"):
        return heads.reuse(model.transformer.ln_f, model.lm_head)
    return heads.reuse(model.model.norm, model.lm_head)


def layer_names(model: nn.Module) -> list[str]:
    prefix = "transformer.h" if hasattr(model, "transformer") else "model.layers"
    n = model.config.num_hidden_layers
    return [f"{prefix}.{i}" for i in range(n)]


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


# ------------------------------------------------------------------------------ heads.reuse


@pytest.mark.parametrize("kind", list(MODELS))
def test_reuse_is_one_shared_head_with_the_models_parameters(kind: str) -> None:
    model = MODELS[kind]()
    head = exit_head(model)
    taps = layer_names(model)[:-1]
    sup = DeepSupervision(model, taps, head=head)
    assert all(sup.heads[t] is head for t in taps)
    assert all(a is b for a, b in zip(head.reused, head.reused))
    assert head.reused[-1] is model.lm_head
    # parameters once: exactly the model's, no head copies
    assert [id(p) for p in sup.parameters()] == [id(p) for p in model.parameters()]
    keys = list(sup.state_dict())
    assert [k for k in keys if not k.startswith("model.")] == ["_extra_state"]
    assert sup.unwrap() is model
    assert model.lm_head is head.reused[-1]


@pytest.mark.parametrize("kind", list(MODELS))
def test_reuse_gradients_of_every_exit_accumulate(kind: str) -> None:
    model = MODELS[kind]().train()
    for m in model.modules():  # dropout off: the reference forward must be the same
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    taps = layer_names(model)[:-1]
    sup = DeepSupervision(model, dict.fromkeys(taps, 1.0), head=exit_head(model))
    ids = torch.randint(0, VOCAB, (2, 9))
    out, preds = sup(input_ids=ids)
    total = sum(p.float().square().mean() for p in preds.values())
    total.backward()
    got = model.lm_head.weight.grad.clone()
    # reference: hidden states of the bare model, through its own final norm and lm_head
    model.zero_grad()
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    norm = model.transformer.ln_f if kind == "gpt2" else model.model.norm
    ref = sum(model.lm_head(norm(h)).float().square().mean() for h in hidden[1:-1])
    ref.backward()
    torch.testing.assert_close(got, model.lm_head.weight.grad)


def test_reuse_deepcopy_keeps_the_sharing_inside_the_copy() -> None:
    model = tiny_llama(2)
    sup = DeepSupervision(model, ["model.layers.0"], head=exit_head(model))
    twin = copy.deepcopy(sup)
    assert twin.heads["model.layers.0"].reused[-1] is twin.model.lm_head
    assert twin.model.lm_head is not model.lm_head


def test_untied_heads_per_exit_stay_possible() -> None:
    model = tiny_llama(3)
    untied = nn.Sequential(copy.deepcopy(model.model.norm), copy.deepcopy(model.lm_head))
    sup = DeepSupervision(model, ["model.layers.0", "model.layers.1"], head=untied)
    a, b = sup.heads["model.layers.0"], sup.heads["model.layers.1"]
    assert a is not b and a[1].weight is not b[1].weight
    torch.testing.assert_close(a[1].weight, model.lm_head.weight)
    n_model = len(list(model.parameters()))
    assert len(list(sup.parameters())) == n_model + 2 * 2  # norm weight, lm_head weight each


def test_reuse_refuses_modules_outside_the_model() -> None:
    model = tiny_llama(2)
    with pytest.raises(ConfigError, match="not a module of the wrapped LlamaForCausalLM"):
        DeepSupervision(model, ["model.layers.0"], head=heads.reuse(nn.Linear(32, VOCAB)))
    with pytest.raises(ConfigError, match="at least one module"):
        heads.reuse()
    with pytest.raises(ConfigTypeError, match=r"argument 1 must be an nn\.Module"):
        heads.reuse(model.lm_head, "lm_head")  # type: ignore[arg-type]


def test_reuse_eval_is_the_bare_model() -> None:
    model = tiny_gpt2(2)
    ids = torch.randint(0, VOCAB, (2, 6))
    ref = model(input_ids=ids).logits
    sup = DeepSupervision(model, ["transformer.h.0"], head=exit_head(model)).eval()
    assert torch.equal(sup(input_ids=ids).logits, ref)


# ------------------------------------------------------------------------------ NextToken


def hf_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.parametrize("kind", list(MODELS))
def test_next_token_equals_hf_loss_per_exit_bitwise(kind: str) -> None:
    model = MODELS[kind]()
    taps = layer_names(model)
    head = exit_head(model)
    sup = DeepSupervision(model, dict.fromkeys(taps, 1.0), head=head, criterion=losses.NextToken())
    sup.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ids, mask, labels = padded_batch()
    out, aux = sup(input_ids=ids, attention_mask=mask, target=labels)
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i, tap in enumerate(taps):
        ref = hf_loss(head(hidden[i + 1]) if i + 1 < len(taps) else out.logits, labels)
        assert torch.equal(aux.raw[tap], ref.detach()), tap
        assert torch.equal(aux[tap], ref.detach() * 1.0)
    # the model's own labels= loss is NextToken on its output, to the bit
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(losses.NextToken()(out.logits, labels), own)


def test_next_token_upcasts_like_hf_and_ignores() -> None:
    logits = torch.randn(2, 7, VOCAB, dtype=torch.bfloat16)
    _, _, labels = padded_batch()
    labels = labels[:2, :7]
    assert torch.equal(losses.NextToken()(logits, labels), hf_loss(logits, labels))
    # no label left: 0, not NaN (HF gives NaN)
    none = torch.full((2, 7), -100)
    none[:, 0] = 3  # only the first token: no position predicts it
    assert losses.NextToken()(logits, none).item() == 0.0
    assert torch.isnan(hf_loss(logits, none))
    with pytest.raises(TargetError, match=r"logits \(B, T, V\)"):
        losses.NextToken()(logits[:, :, 0], labels)


def test_causal_labels_shift_and_mask() -> None:
    ids, mask, labels = padded_batch()
    got = DF.causal_labels(ids, attention_mask=mask)
    assert torch.equal(got[:, :-1], labels[:, 1:])
    assert (got[:, -1] == -100).all()
    assert torch.equal(DF.causal_labels(labels), got)
    with pytest.raises(TargetError, match="integer tensor"):
        DF.causal_labels(ids.float())
    with pytest.raises(TargetError, match="attention_mask must have"):
        DF.causal_labels(ids, attention_mask=mask[:, :3])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(2, 12),
    st.integers(0, 2**16),
)
def test_next_token_matches_a_direct_computation(b: int, t: int, v: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    labels = torch.randint(-1, v, (b, t), generator=g).masked_fill_(
        torch.rand(b, t, generator=g) < 0.3, -100
    )
    terms = [
        -torch.log_softmax(logits[i, j], -1)[labels[i, j + 1]]
        for i in range(b)
        for j in range(t - 1)
        if labels[i, j + 1] >= 0
    ]
    ref = torch.stack(terms).mean() if terms else torch.tensor(0.0)
    got = losses.NextToken()(logits, labels.where(labels >= 0, -100))
    torch.testing.assert_close(got, ref)


# ------------------------------------------------------------------ depth scales, curricula


def torchtune_scales(rule: str, layer_ids: list[int], n_layers: int, e: float) -> list[float]:
    """torchtune's early_exit_loss scales (modules/early_exit_loss.py), re-derived."""
    ids = torch.tensor(layer_ids, dtype=torch.float64)
    r = {
        "one": torch.ones_like(ids),
        "l": ids + 1,
        "sum_l": torch.cumsum(ids + 1, 0),
        "inv_l": 1 / (ids + 1),
        "sqrt_l": torch.sqrt(ids + 1),
        "inv_sqrt_l": 1 / torch.sqrt(ids + 1),
    }[rule]
    r = r * torch.where(ids < n_layers - 1, torch.full_like(ids, e), torch.ones_like(ids))
    return (r / r.sum()).tolist()


@pytest.mark.parametrize("rule", schedules.DEPTH_SCALES)
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_depth_weights_are_torchtunes_up_to_one_factor(rule: str, scale: float) -> None:
    taps = [f"model.layers.{i}" for i in range(7)]
    ours = schedules.depth_weights(taps, rule, scale=scale)
    ref = torchtune_scales(rule, list(range(8)), 8, scale)
    factor = ref[-1]  # ours has the main loss at weight 1
    for t, r in zip(taps, ref[:-1]):
        assert ours[t] == pytest.approx(r / factor, rel=1e-12)


def test_curricula_schedules() -> None:
    taps = [f"l.{i}" for i in range(3)]
    rot = schedules.rotational(taps, schedules.depth_weights(taps, "l"), every=2)
    on = [[n for n, s in rot.items() if s(t) > 0] for t in range(8)]
    assert on == [["l.0"], ["l.0"], ["l.1"], ["l.1"], ["l.2"], ["l.2"], ["l.0"], ["l.0"]]
    assert rot["l.2"](4) == 0.75
    grad = schedules.gradual(taps, total=100, fraction=0.5, layers=4)
    first_on = {n: next(t for t in range(101) if s(t) > 0) for n, s in grad.items()}
    assert first_on == {"l.0": 50, "l.1": 38, "l.2": 25}  # deepest first
    with pytest.raises(ConfigError, match="rule must be one of"):
        schedules.depth_weights(taps, "exp")
    with pytest.raises(ConfigError, match="without the taps"):
        schedules.rotational(taps, {"l.0": 1.0})
    with pytest.raises(ConfigTypeError, match="list of tap names"):
        schedules.gradual("l.0", total=3)


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object) -> None:
        self.calls += 1


def test_a_tap_at_weight_zero_runs_no_head_and_builds_no_graph() -> None:
    model = tiny_llama(4).train()
    taps = layer_names(model)[:-1]
    sup = DeepSupervision(
        model, schedules.rotational(taps), head=exit_head(model), criterion=losses.NextToken()
    )
    calls = Counter()
    model.lm_head.register_forward_hook(calls)
    ids = torch.randint(0, VOCAB, (2, 8))
    for step in range(len(taps)):
        calls.calls = 0
        out, aux = sup(input_ids=ids, target=ids)
        assert calls.calls == 2  # the model's own output and the one active exit
        active = taps[step]
        assert list(aux.raw) == [active]
        for t in taps:
            assert (aux[t].grad_fn is not None) == (t == active)
            if t != active:
                assert aux[t].item() == 0.0
        # the gradient is that of the one active exit
        model.zero_grad()
        sum(aux.values()).backward()
        got = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = losses.NextToken()(model.lm_head(model.model.norm(hidden[step + 1])), ids)
        ref.backward()
        for g, p in zip(got, model.parameters()):
            if g is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(g, p.grad)
        sup.step()


def test_a_head_with_parameters_still_runs_at_weight_zero() -> None:
    model = tiny_llama(3).train()
    untied = nn.Sequential(nn.RMSNorm(32), nn.Linear(32, VOCAB))
    sup = DeepSupervision(model, {"model.layers.0": 0.0}, head=untied, criterion=losses.NextToken())
    ids = torch.randint(0, VOCAB, (2, 8))
    _, aux = sup(input_ids=ids, target=ids)
    assert aux["model.layers.0"].grad_fn is not None  # multiplied by 0: DDP sees its grads
    assert "model.layers.0" in aux.raw


# -------------------------------------------------------------- self-speculative decoding


def greedy(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(
        ids,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
    )


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("draft", [1, 3])
def test_speculative_output_equals_greedy_decoding(kind: str, draft: int) -> None:
    model = MODELS[kind](4, seed=1)
    taps = layer_names(model)[:-1]
    sup = DeepSupervision(model, taps, head=exit_head(model)).eval()
    g = torch.Generator().manual_seed(2)
    decoders = [SelfSpeculativeDecoder(sup, exit=t, draft_tokens=draft) for t in taps]
    for i in range(12):  # many prompts, every exit
        prompt = torch.randint(
            0, VOCAB, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g
        )
        n = 6 + i % 5
        dec = decoders[i % len(decoders)]
        got = dec.generate(prompt, max_new_tokens=n)
        assert torch.equal(got, greedy(model, prompt, n)), (i, dec.exit)
        assert 0 <= dec.stats.accepted <= dec.stats.drafted
    # the hooks only act inside a draft: eval is still the bare model
    ids = torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(sup(input_ids=ids).logits, model(input_ids=ids).logits)


def test_hf_assistant_early_exit_applies_to_a_model_trained_through_deepsup() -> None:
    """HF's assistant_early_exit=k drafts with what heads.reuse trains on model.layers.{k-1}:
    after a training step through the wrapper, its tokens equal SelfSpeculativeDecoder's and
    greedy's."""
    model = tiny_llama(4, seed=4)
    sup = DeepSupervision(model, ["model.layers.1"], head=exit_head(model),
                          criterion=losses.NextToken())  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    sup.train()
    out, aux = sup(input_ids=ids, labels=ids, target=ids)
    (out.loss + sum(aux.values())).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    sup.eval()
    dec = SelfSpeculativeDecoder(sup, exit="model.layers.1", draft_tokens=3)
    prompt = torch.tensor([[7, 3, 9, 2]])
    hf = model.generate(
        prompt, do_sample=False, max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
        pad_token_id=0, assistant_early_exit=2,
    )  # fmt: skip
    assert torch.equal(hf, greedy(model, prompt, 10))
    assert torch.equal(dec.generate(prompt, max_new_tokens=10), hf)


def test_speculative_accepts_every_draft_from_the_last_layer() -> None:
    model = tiny_llama(3, seed=3)
    sup = DeepSupervision(model, ["model.layers.2"], head=exit_head(model)).eval()
    dec = SelfSpeculativeDecoder(sup, exit="model.layers.2", draft_tokens=4)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(dec.generate(prompt, max_new_tokens=9), greedy(model, prompt, 9))
    assert dec.stats.drafted > 0 and dec.stats.acceptance == pytest.approx(1.0)


def test_speculative_misuse() -> None:
    model = tiny_gpt2(2)
    sup = DeepSupervision(model, ["transformer.h.0"], head=exit_head(model))
    with pytest.raises(ConfigError, match="not a tap of the wrapper"):
        SelfSpeculativeDecoder(sup, exit="transformer.h.1")
    dec = SelfSpeculativeDecoder(sup, exit="transformer.h.0")
    sup.train()
    with pytest.raises(UsageError, match=r"call sup\.eval"):
        dec.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    sup.eval()
    with pytest.raises(UsageError, match="one sequence"):
        dec.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2)
    dec.remove()
    assert len(model.transformer.h[0]._forward_hooks) == 1  # the wrapper's own tap hook


# ------------------------------------------------------------------------------ layer dropout


def test_layer_dropout_skips_rows_deeper_more_often_and_leaves_eval_alone() -> None:
    model = tiny_llama(3).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, VOCAB, (64, 5))
    bare = model.eval()(input_ids=ids, output_hidden_states=True)
    ref = bare.hidden_states
    drop = LayerDropout(model, layer_names(model)[:2], p_max=1.0)
    assert drop.p == {"model.layers.0": 0.0, "model.layers.1": 1.0}
    assert torch.equal(model(input_ids=ids).logits, bare.logits)  # eval: untouched
    seen: dict[int, torch.Tensor] = {}

    def record(i: int):  # type: ignore[no-untyped-def]
        return lambda m, args, kwargs: seen.__setitem__(
            i, args[0] if args else kwargs["hidden_states"]
        )

    hooks = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    model.train()(input_ids=ids)
    torch.testing.assert_close(seen[1], ref[1])  # layer 0: never skipped
    assert torch.equal(seen[2], seen[1])  # layer 1: always skipped, its input passes through
    drop.remove()
    half = LayerDropout(model, ["model.layers.1"], p_max=0.5)
    torch.manual_seed(0)
    model(input_ids=ids)
    skipped = (seen[2] == seen[1]).flatten(1).all(1)
    assert 15 < int(skipped.sum()) < 49  # per sample, about half of 64
    half.remove()
    for h in hooks:
        h.remove()
    with pytest.raises(ConfigError, match="not a submodule"):
        LayerDropout(model, ["model.layers.9"], p_max=0.1)


@pytest.mark.slow
def test_compiled_wrapper_follows_the_rotating_exit() -> None:
    model = tiny_llama(3).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    taps = layer_names(model)[:-1]
    sup = DeepSupervision(
        model, schedules.rotational(taps), head=exit_head(model), criterion=losses.NextToken()
    )
    compiled = torch.compile(sup)
    ids = torch.randint(0, VOCAB, (2, 8))
    for step in range(3):
        sup.progress = step
        _, want = sup(input_ids=ids, target=ids)
        _, got = compiled(input_ids=ids, target=ids)
        assert list(got.raw) == [taps[step % len(taps)]]
        for k in want:
            torch.testing.assert_close(got[k], want[k])
