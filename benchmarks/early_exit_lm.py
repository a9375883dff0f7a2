"""Early exits of a causal LM: step time with 1 of 8 exits on vs all 8, and self-speculative vs
plain greedy decoding (tokens/s, same outputs).

Part 1: a Hugging Face Llama built from a config (9 layers, width 128, vocabulary 8192: the
vocabulary projection is the expensive part of an exit), ``heads.reuse(norm, lm_head)`` on
layers 0..7 with ``losses.NextToken``; one training step (forward, backward) with every exit on,
with one on (``schedules.rotational``: the 7 others run no head), and with none, interleaved.

Part 2: ``SelfSpeculativeDecoder`` (exit at layer 2 of 6, 4 drafted tokens) against
``model.generate(do_sample=False)``, interleaved, on two models that bound what training buys:
a random model (its early exit rarely agrees with the output: acceptance near 0) and the same
model with layers 3..5 turned into identities (zeroed output projections: the exit *is* the
output, acceptance 1). A trained model lies between; ``examples/early_exit_lm.py`` measures one.
Hugging Face's own ``model.generate(assistant_early_exit=3)`` (the same draft: the first 3 layers,
then the model's norm and ``lm_head``, which is what ``heads.reuse`` trains) runs beside them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import transformers
from _common import Stats, emit, interleave, machine, paired, parser, pick, setup, table

from deepsup import DeepSupervision, SelfSpeculativeDecoder, heads, losses, schedules


def llama(layers: int, vocab: int, width: int = 128) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg)


def exits_step(rounds: int, warmup: int, quick: bool) -> tuple[str, Stats]:
    torch.manual_seed(0)
    seq, batch = (64, 2) if quick else (128, 4)
    model = llama(9, 8192).train()
    taps = [f"model.layers.{i}" for i in range(8)]
    head = heads.reuse(model.model.norm, model.lm_head)
    ids = torch.randint(0, 8192, (batch, seq))
    sups = {
        "8 exits": DeepSupervision(model, taps, head=head, criterion=losses.NextToken()),
        "1 exit": DeepSupervision(
            model, schedules.rotational(taps), head=head, criterion=losses.NextToken()
        ),
        "0 exits": DeepSupervision(
            model, dict.fromkeys(taps, 0.0), head=head, criterion=losses.NextToken()
        ),
    }

    def step(sup: DeepSupervision) -> None:
        out, aux = sup(input_ids=ids, labels=ids, target=ids)
        (out.loss + sum(aux.values())).backward()
        model.zero_grad(set_to_none=True)

    times = interleave(
        {k: (lambda s=s: step(s)) for k, s in sups.items()}, rounds=rounds, warmup=warmup
    )
    ratio = paired(times, "8 exits", "1 exit")
    rows = [[k, Stats.of(v).fmt(1e3, 1, " ms")] for k, v in times.items()]
    rows.append(["1 exit / 8 exits", paired(times, "8 exits", "1 exit").fmt(1, 3)])
    rows.append(["0 exits / 8 exits", paired(times, "8 exits", "0 exits").fmt(1, 3)])
    body = (
        f"Training step (forward + backward), batch {batch} x {seq} tokens, 9 layers, "
        f"vocabulary 8192, {rounds} interleaved rounds, median [q1, q3]:\n\n"
        + table(["variant", "time per step"], rows)
    )
    return body, ratio


def hf_early_exit(model: transformers.LlamaForCausalLM, prompt: torch.Tensor, new: int) -> Any:
    """HF's self-speculative decoding with the same draft: the first 3 layers."""
    return model.generate(
        prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
        assistant_early_exit=3,
    )  # fmt: skip


def decoding(rounds: int, warmup: int, quick: bool) -> str:
    new = 24 if quick else 64
    rows = []
    for label, identity in (("random model", False), ("layers 3-5 identity", True)):
        torch.manual_seed(1)
        model = llama(6, 512).eval()
        if identity:
            with torch.no_grad():
                for layer in model.model.layers[3:]:
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
        sup = DeepSupervision(
            model, ["model.layers.2"], head=heads.reuse(model.model.norm, model.lm_head)
        ).eval()
        dec = SelfSpeculativeDecoder(sup, exit="model.layers.2", draft_tokens=4)
        prompt = torch.randint(0, 512, (1, 16))
        plain = model.generate(
            prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
        )
        spec = dec.generate(prompt, max_new_tokens=new)
        same = torch.equal(plain, spec) and torch.equal(plain, hf_early_exit(model, prompt, new))
        times = interleave(
            {
                "greedy": lambda m=model, p=prompt: m.generate(
                    p, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
                ),
                "speculative": lambda d=dec, p=prompt: d.generate(p, max_new_tokens=new),
                "hf": lambda m=model, p=prompt: hf_early_exit(m, p, new),
            },
            rounds=rounds,
            warmup=warmup,
        )
        g, s, h = (Stats.of(times[k]) for k in ("greedy", "speculative", "hf"))
        rows.append(
            [
                label,
                f"{dec.stats.acceptance:.2f}",
                f"{new / g.median:.0f}",
                f"{new / s.median:.0f}",
                paired(times, "speculative", "greedy").fmt(1, 2),
                f"{new / h.median:.0f}",
                paired(times, "hf", "greedy").fmt(1, 2),
                "yes" if same else "NO",
            ]
        )
    return (
        f"Decoding {new} tokens after a 16-token prompt, 6 layers, exit after layer 2, 4 drafted "
        f"tokens per round, {rounds} interleaved rounds:\n\n"
        + table(
            [
                "model",
                "acceptance",
                "greedy tok/s",
                "speculative tok/s",
                "speed-up (greedy time / spec. time)",
                "HF assistant_early_exit tok/s",
                "HF speed-up (greedy time / HF time)",
                "same tokens (all three)",
            ],
            rows,
        )
    )


def main() -> None:
    args = parser(__doc__).parse_args()
    setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 12, 4)
    warmup = pick(args, "warmup", 2, 1)
    part1, _ = exits_step(rounds, warmup, args.quick)
    part2 = decoding(rounds, warmup, args.quick)
    info = machine(args.device)
    body = (
        f"{part1}\n\n{part2}\n\nMachine: {info.get('cpu', '?')}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads."
    )
    emit(args, "Early exits of a causal LM (issue 17)", body, started=started)


if __name__ == "__main__":
    sys.exit(main())
