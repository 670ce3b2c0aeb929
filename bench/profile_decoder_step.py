"""Where a TIGER training step spends its time: torch.profiler over a few steps, grouped by operator.

    python bench/profile_decoder_step.py --threads 1                       # both layouts, ml_small preset sizes
    python bench/profile_decoder_step.py --architecture decoder_only --dropout 0.0

The model is the ml_small presets' (configs/decoder_ml_small*.gin: d_model 64, 4 heads x 32, MLP 256,
4 layers) on synthetic full 20-item histories with the real vocabulary (256, 256, 256, 8), batch 128
windows: the encoder-decoder with its causal encoder and 10 targets per window, the decoder-only
token stream (TigerLM) and item stream (TigerItemLM) with 20 (the pipeline preset's item stream reads
50-item windows; 20 here keeps the three comparable). Prints per layout the step time, targets/s and the operators that take the most
self CPU time (bench/results/decoder_profile.md records a run).
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `modules` imports

import argparse
import os
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from modules.sequences import Vocabulary, random_semantic_ids, semantic_id_tokens
from modules.tiger import Tiger
from modules.tiger_lm import TigerItemLM, TigerLM

CODEBOOK_SIZES = (256, 256, 256, 8)
HISTORY = 20
PRESET = dict(embed_dim=64, attn_dim=128, n_heads=4, mlp_dim=256, n_layers=4)
TARGETS = {"encoder_decoder": 10, "decoder_only": 20, "item_stream": 20}
ORDER = ["encoder_decoder", "decoder_only", "item_stream"]


def batch(vocab, semantic_ids, item_tokens, size, n_targets, rng):
    """A training batch of windows of HISTORY + 1 items: src (the first HISTORY), the last n_targets as targets."""
    items = rng.integers(0, len(semantic_ids), (size, HISTORY + 1))
    users = rng.integers(0, vocab.n_user_buckets, size) + vocab.user_token_offset
    src = np.concatenate([users[:, None], item_tokens[items[:, :HISTORY]].reshape(size, -1)], 1)
    visible = np.tile(np.arange(HISTORY - n_targets + 1, HISTORY + 1), (size, 1))
    return torch.as_tensor(src), torch.as_tensor(semantic_ids[items[:, HISTORY + 1 - n_targets:]]), torch.as_tensor(visible)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", choices=sorted(TARGETS), action="append",
                        help="layout(s) to profile (default both)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    vocab = Vocabulary(CODEBOOK_SIZES, n_user_buckets=2000)
    semantic_ids = random_semantic_ids(9742, CODEBOOK_SIZES, seed=0)
    item_tokens = semantic_id_tokens(semantic_ids, vocab)
    print(f"load average {os.getloadavg()}, {args.threads} thread(s), batch {args.batch}, dropout {args.dropout}")
    for architecture in args.architecture or ORDER:
        torch.manual_seed(0)
        n_targets = TARGETS[architecture]
        model = (Tiger(vocab, HISTORY, causal_encoder=True, dropout=args.dropout, **PRESET) if architecture == "encoder_decoder"
                 else TigerLM(vocab, HISTORY, dropout=args.dropout, **PRESET) if architecture == "decoder_only"
                 else TigerItemLM(vocab, HISTORY, dropout=args.dropout, **PRESET)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = [batch(vocab, semantic_ids, item_tokens, args.batch, n_targets, rng) for _ in range(4)]

        def step(i):
            loss = model(*batches[i % 4])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        for i in range(3):
            step(i)
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        seconds = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(i)
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {architecture}: {seconds * 1000:.0f} ms/step, {args.batch * n_targets / seconds:.0f} targets/s "
              f"({n_targets} targets per window)\n")
        print("| operator | share of self CPU time |\n|---|---:|")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"| `{event.key}` | {100 * event.self_cpu_time_total / total:.1f}% |")


if __name__ == "__main__":
    main()
