"""Speed levers of a TIGER training step, each measured on its own (docs/results/tiger_speed_ml_small.md, section 2).

    python bench/bench_decoder_levers.py                         # every variant, 1 thread
    python bench/bench_decoder_levers.py --variants tiger,item --steps 10

Variants, at the ml_small presets' sizes (d_model 64, 4 heads x 32, MLP 256, 4 layers), batch 128 windows of
synthetic 20-item histories, AdamW step included, ms per step after 3 warm-up steps:
tiger (encoder-decoder, causal encoder, 10 targets per window), tiger_nodrop, tiger_bf16, lm (TigerLM, 20
targets), lm_nodrop, lm_bf16, lm_compile, item (TigerItemLM, 20 targets). Then `attention`: forward +
backward of scaled_dot_product_attention at the paper preset's shape (128 x 6 heads x 81 tokens x 64) with
and without a padding mask and attention dropout. Prints a markdown table.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `modules` imports

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.profile_decoder_step import HISTORY, batch as synthetic_batch
from modules.sequences import Vocabulary, random_semantic_ids, semantic_id_tokens
from modules.tiger import Tiger
from modules.tiger_lm import TigerItemLM, TigerLM

BATCH = 128
SIZES = dict(embed_dim=64, attn_dim=128, n_heads=4, mlp_dim=256, n_layers=4)
# name: (model class, targets per window, dropout, bf16 autocast, torch.compile)
VARIANTS = {"tiger": (Tiger, 10, 0.1, False, False), "tiger_nodrop": (Tiger, 10, 0.0, False, False),
            "tiger_bf16": (Tiger, 10, 0.1, True, False), "lm": (TigerLM, 20, 0.1, False, False),
            "lm_nodrop": (TigerLM, 20, 0.0, False, False), "lm_bf16": (TigerLM, 20, 0.1, True, False),
            "lm_compile": (TigerLM, 20, 0.1, False, True), "item": (TigerItemLM, 20, 0.1, False, False)}


def step_ms(name: str, steps: int) -> float:
    """ms per training step of one variant on fixed synthetic batches."""
    model_class, n_targets, dropout, bf16, compiled = VARIANTS[name]
    vocab = Vocabulary((256, 256, 256, 8), 2000)
    ids = random_semantic_ids(9742, vocab.codebook_sizes, 0)
    tokens = semantic_id_tokens(ids, vocab)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(vocab, ids, tokens, BATCH, n_targets, rng) for _ in range(4)]
    torch.manual_seed(0)
    extra = {"causal_encoder": True} if model_class is Tiger else {}
    model = model_class(vocab, HISTORY, dropout=dropout, **SIZES, **extra).train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

    def step(i):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(*batches[i % 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(3):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - start) / steps * 1000


def attention_ms(repeats: int = 10) -> dict:
    """Forward + backward ms of SDPA at the paper preset's shape, with / without mask and attention dropout."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(128, 6, 81, 64, requires_grad=True) for _ in range(3))
    keep = torch.ones(128, 1, 1, 81, dtype=torch.bool)
    keep[:10, ..., :20] = False
    float_mask = torch.zeros(128, 1, 1, 81).masked_fill(~keep, float("-inf"))
    cases = {"bool mask, attention dropout 0.1": dict(attn_mask=keep, dropout_p=0.1),
             "bool mask, no dropout": dict(attn_mask=keep), "float mask, no dropout": dict(attn_mask=float_mask),
             "no mask, attention dropout 0.1": dict(dropout_p=0.1), "no mask, no dropout": {}}
    out = {}
    for label, kwargs in cases.items():
        run = lambda: F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        out[label] = (time.perf_counter() - start) / repeats * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(list(VARIANTS) + ["attention"]))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, {args.threads} thread(s), batch {BATCH}")
    print("| variant | ms / step | targets / s |\n|---|---:|---:|")
    for name in args.variants.split(","):
        if name == "attention":
            continue
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: use {', '.join(VARIANTS)} or attention")
        ms = step_ms(name, args.steps)
        print(f"| {name} | {ms:.0f} | {BATCH * VARIANTS[name][1] / ms * 1000:,.0f} |", flush=True)
    if "attention" in args.variants.split(","):
        print("\n| attention (128 x 6 x 81 x 64), forward + backward | ms |\n|---|---:|")
        for label, ms in attention_ms().items():
            print(f"| {label} | {ms:.0f} |")


if __name__ == "__main__":
    main()
