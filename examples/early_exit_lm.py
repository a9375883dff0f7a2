"""Early-exit training of a small Llama-style LM on the standard library's own code, and
self-speculative decoding from its exits.

A byte-level LlamaForCausalLM (transformers, built from a config: no download) is trained from
scratch on the ``.py`` files of the standard library of the running Python, split by file into
train / val / test (sorted names: every 10th file to val, the next to test). Per seed, three
runs: ``plain`` (the model's own loss), ``ee`` (plus LayerSkip's early-exit loss on every layer
but the last: ``heads.reuse(norm, lm_head)``, ``losses.NextToken``, ``schedules.depth_weights``)
and ``ee-ld`` (``ee`` with LayerSkip's layer dropout, ``deepsup.LayerDropout``, rule ``exp``).
Then per exit the validation loss and perplexity, and self-speculative decoding
(``deepsup.SelfSpeculativeDecoder``) from each exit against plain greedy decoding on test
prompts: acceptance, tokens/s and whether the outputs are identical.

    python examples/early_exit_lm.py                 # 120 steps per run: 3 seeds x 3 configs
    python examples/early_exit_lm.py --quick         # seconds, for the tests
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import transformers
from _shared import format_mean_std, set_threads
from tqdm import tqdm

from deepsup import (
    DeepSupervision,
    LayerDropout,
    SelfSpeculativeDecoder,
    heads,
    losses,
    schedules,
)

CONFIGS = ("plain", "ee", "ee-ld")  # ee-ld: the early-exit loss and LayerSkip's layer dropout


def corpus_files() -> dict[str, list[Path]]:
    """The stdlib's top-level ``.py`` files, split by file: a fixed, sorted list."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    split: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for i, f in enumerate(files):
        split["val" if i % 10 == 0 else "test" if i % 10 == 1 else "train"].append(f)
    return split


def as_bytes(files: list[Path]) -> torch.Tensor:
    data = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def build(layers: int, width: int, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=int(2.75 * width),
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg)


def batches(data: torch.Tensor, n: int, size: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (n, size), generator=g)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def train(config: str, seed: int, args: argparse.Namespace, data: torch.Tensor) -> DeepSupervision:
    model = build(args.layers, args.width, seed)
    taps = [f"model.layers.{i}" for i in range(args.layers - 1)]
    ee = config in ("ee", "ee-ld")
    weights = schedules.depth_weights(taps, "sum_l", scale=args.ee_scale) if ee else {}
    if config == "ee-ld":  # before the wrapper, so that its taps see the mixed outputs
        LayerDropout(model, [f"model.layers.{i}" for i in range(args.layers)],
                     p_max=args.layer_drop, rule="exp")  # fmt: skip
    sup = DeepSupervision(
        model,
        weights if ee else dict.fromkeys(taps, 0.0),  # weight 0: no head runs
        head=heads.reuse(model.model.norm, model.lm_head),
        criterion=losses.NextToken(),
    )
    opt = torch.optim.AdamW(sup.parameters(), lr=args.lr, weight_decay=0.01)
    sup.train()
    for ids in tqdm(
        batches(data, args.steps, args.batch, args.seq, seed), desc=f"{config} s{seed}"
    ):
        out, aux = sup(input_ids=ids, labels=ids, target=ids)
        loss = out.loss + sum(aux.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sup.parameters(), 1.0)
        opt.step()
    return sup.eval()


@torch.no_grad()
def exit_losses(sup: DeepSupervision, data: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Validation loss (nats/byte) of each exit, the model's output last."""
    totals = [0.0] * args.layers
    val = batches(data, args.val_batches, args.batch, args.seq, 1234)
    for ids in val:
        preds = sup.exits(input_ids=ids)
        for i, tap in enumerate(list(sup.heads)):
            totals[i] += float(losses.NextToken()(preds[tap], ids))
        totals[-1] += float(losses.NextToken()(preds["output"].logits, ids))
    return [t / len(val) for t in totals]


def decode(
    sup: DeepSupervision, data: torch.Tensor, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Per exit: acceptance, tokens/s of speculative and greedy decoding, identical outputs."""
    model = sup.model
    prompts = batches(data, args.prompts, 1, 32, 99)
    n = args.new_tokens
    out = {}
    for tap in sup.heads:
        dec = SelfSpeculativeDecoder(sup, exit=tap, draft_tokens=4)
        t_spec = t_greedy = 0.0
        drafted = accepted = 0
        same = True
        for p in prompts:  # interleaved: greedy, speculative, prompt by prompt
            t0 = time.perf_counter()
            ref = model.generate(
                p, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
            )
            t1 = time.perf_counter()
            got = dec.generate(p, max_new_tokens=n)
            t2 = time.perf_counter()
            t_greedy += t1 - t0
            t_spec += t2 - t1
            drafted += dec.stats.drafted
            accepted += dec.stats.accepted
            same = same and torch.equal(ref, got)
        dec.remove()
        total = n * len(prompts)
        out[tap] = {
            "acceptance": accepted / max(drafted, 1),
            "spec_tps": total / t_spec,
            "greedy_tps": total / t_greedy,
            "speedup": t_greedy / t_spec,
            "same": float(same),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ee-scale", type=float, default=1.0)
    p.add_argument("--layer-drop", type=float, default=0.2, help="ee-ld: the last layer's p")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/early_exit_lm"))
    p.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.batch, args.seq = [0], 3, 2, 32
        args.layers, args.width, args.val_batches, args.prompts, args.new_tokens = 3, 32, 1, 1, 6
    print(set_threads(args.threads))
    split = corpus_files()
    data = {k: as_bytes(v) for k, v in split.items()}
    print(", ".join(f"{k}: {len(split[k])} files, {len(data[k]) / 1e6:.2f} MB" for k in data))
    results: dict[str, list[list[float]]] = {c: [] for c in CONFIGS}
    speculative: dict[str, list[dict[str, dict[str, float]]]] = {c: [] for c in CONFIGS}
    for seed in args.seeds:
        for config in CONFIGS:
            sup = train(config, seed, args, data["train"])
            results[config].append(exit_losses(sup, data["val"], args))
            speculative[config].append(decode(sup, data["test"], args))

    print(f"\nValidation loss per exit (nats/byte; perplexity), mean ± std over seeds {args.seeds}")
    header = ["config"] + [f"L{i + 1}" for i in range(args.layers)]
    print(" | ".join(header))
    for c in CONFIGS:
        cells = [
            f"{format_mean_std([r[i] for r in results[c]])} "
            f"({torch.tensor([r[i] for r in results[c]]).exp().mean():.1f})"
            for i in range(args.layers)
        ]
        print(" | ".join([c, *cells]))
    print("\nSelf-speculative decoding (4 drafted tokens) vs greedy, mean ± std over seeds")
    print("config | exit | acceptance | speculative tok/s | greedy tok/s | speed-up | same")
    for c in CONFIGS:
        for tap in speculative[c][0]:
            runs = [s[tap] for s in speculative[c]]
            print(
                " | ".join(
                    [
                        c,
                        tap,
                        format_mean_std([r["acceptance"] for r in runs]),
                        format_mean_std([r["spec_tps"] for r in runs], 0),
                        format_mean_std([r["greedy_tps"] for r in runs], 0),
                        format_mean_std([r["speedup"] for r in runs]),
                        "yes" if all(r["same"] for r in runs) else "NO",
                    ]
                )
            )
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    for c in CONFIGS:
        mean = torch.tensor(results[c]).mean(0)
        ax.plot(range(1, args.layers + 1), mean.tolist(), marker="o", label=c)
    ax.set(xlabel="exit (layer)", ylabel="val loss (nats/byte)", title="Loss per exit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "exit_losses.png")
    print(f"\nplot: {args.out / 'exit_losses.png'}")


if __name__ == "__main__":
    main()
