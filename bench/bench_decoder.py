"""Speed of the TIGER decoder: training examples/s and constrained beam-search users/s.

    python bench/bench_decoder.py                      # TIGER preset, batch 256, beam 20 / top-10, CPU
    python bench/bench_decoder.py --device cuda --eval-batch 1024
    python bench/bench_decoder.py --targets-per-window 10   # causal encoder, 10 targets per encoder pass
    python bench/bench_decoder.py --compare-hf              # side by side with Hugging Face T5 (transformers: requirements.txt)
    python bench/bench_decoder.py --compare-hf --bf16       # the same, every model trained under CPU bf16 autocast

Synthetic inputs of the real shapes: semantic IDs (256, 256, 256, 8) for --items items (default the
9,742 of ml-latest-small), full 20-item histories, 50 seen items per user. Prints one markdown table
row per measurement (recorded in bench/results/decoder.md) and, with --out, a JSON file.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import json
import os
import time

import numpy as np
import torch

from modules.beam_search import SemanticIdTrie, beam_search
from modules.sequences import Vocabulary, random_semantic_ids, semantic_id_tokens
from modules.tiger import Tiger
from modules.tiger_lm import TigerItemLM, TigerLM

CODEBOOK_SIZES = (256, 256, 256, 8)


def history_tokens(vocab: Vocabulary, item_tokens: np.ndarray, items: np.ndarray, rng) -> torch.Tensor:
    """Model inputs [random user token, tokens of items[r, 0], ...] for item rows (n_rows, history)."""
    users = rng.integers(0, vocab.n_user_buckets, len(items)) + vocab.user_token_offset
    return torch.as_tensor(np.concatenate([users[:, None], item_tokens[items].reshape(len(items), -1)], 1))


def synthetic_inputs(vocab: Vocabulary, item_tokens: np.ndarray, n_rows: int, history: int, rng) -> torch.Tensor:
    """(n_rows, 1 + history*(L+1)) encoder tokens of random full histories."""
    return history_tokens(vocab, item_tokens, rng.integers(0, len(item_tokens), (n_rows, history)), rng)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--items", type=int, default=9742)
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--eval-batch", type=int, default=128, help="users per beam-search call")
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--targets-per-window", type=int, default=1,
                        help="targets trained per encoder pass (>1: causal encoder, as train_decoder.targets_per_window)")
    parser.add_argument("--architecture", choices=["encoder_decoder", "decoder_only", "item_stream"], default="encoder_decoder",
                        help="decoder_only / item_stream: TigerLM / TigerItemLM at the same sizes (8 layers), "
                             "--targets-per-window items per causal pass")
    parser.add_argument("--beam-only", action="store_true", help="skip the training measurement")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--compare-hf", action="store_true",
                        help="time ours against transformers' T5ForConditionalGeneration at the same sizes (bench/compare_hf.py)")
    parser.add_argument("--bf16", action="store_true",
                        help="with --compare-hf: train every model under CPU bf16 autocast (decoding stays float32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.bf16 and not args.compare_hf:
        parser.error("--bf16 is a --compare-hf option (the plain bench times the trainer's own precision).")
    if args.compare_hf:
        if args.device != "cpu":
            parser.error("--compare-hf measures on the CPU only (pass --device cpu): its figures are labelled cpu.")
        from bench.compare_hf import compare
        return compare(args)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vocab = Vocabulary(CODEBOOK_SIZES, n_user_buckets=2000)
    semantic_ids = random_semantic_ids(args.items, CODEBOOK_SIZES, seed=0)
    item_tokens = semantic_id_tokens(semantic_ids, vocab)
    windows = args.targets_per_window
    # The paper preset (the Tiger defaults), with the causal encoder when several targets share a window.
    model = (Tiger(vocab, max_history=20, causal_encoder=windows > 1) if args.architecture == "encoder_decoder"
             else TigerLM(vocab, max_history=20) if args.architecture == "decoder_only"
             else TigerItemLM(vocab, max_history=20)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src = synthetic_inputs(vocab, item_tokens, args.batch, 20, rng).to(device)
    if windows == 1:
        targets = torch.as_tensor(semantic_ids[rng.integers(0, args.items, args.batch)], device=device)
        visible = None
    else:  # the window's last `windows` slots as targets, each seeing the slots before it
        targets = torch.as_tensor(semantic_ids[rng.integers(0, args.items, (args.batch, windows))], device=device)
        visible = torch.arange(20 - windows + 1, 21, device=device).repeat(args.batch, 1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def train_step():
        model.train()
        with autocast:
            loss = model(src, targets) if visible is None else model(src, targets, visible)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_seconds = float("nan") if args.beam_only else timed(train_step, args.steps, device)

    model.eval()
    trie = SemanticIdTrie(torch.as_tensor(semantic_ids), CODEBOOK_SIZES).to(device)
    eval_src = synthetic_inputs(vocab, item_tokens, args.eval_batch, 20, rng).to(device)
    seen = torch.zeros(args.eval_batch, args.items, dtype=torch.bool)
    seen[torch.arange(args.eval_batch)[:, None], torch.as_tensor(rng.integers(0, args.items, (args.eval_batch, 50)))] = True
    seen = seen.to(device)

    def decode(cache: bool):
        with autocast:
            return beam_search(model, eval_src, trie, args.beam, args.top_k, seen=seen, cache=cache)

    # Interleaved, so that both see the same machine load; the two must return the same items.
    uncached_seconds, beam_seconds = 0.0, 0.0
    for _ in range(args.eval_repeats):
        uncached_seconds += timed(lambda: decode(False), 1, device)
        beam_seconds += timed(lambda: decode(True), 1, device)
    same_items = bool(torch.equal(decode(True).items, decode(False).items))
    results = {"device": str(device), "threads": args.threads, "load_average": os.getloadavg(),
               "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "train_examples_per_s": args.batch * windows / train_seconds, "train_batch": args.batch,
               "targets_per_window": windows, "architecture": args.architecture,
               "beam_users_per_s": args.eval_batch * args.eval_repeats / beam_seconds,
               "beam_users_per_s_without_cache": args.eval_batch * args.eval_repeats / uncached_seconds,
               "cached_equals_uncached_items": same_items, "beam": args.beam, "top_k": args.top_k,
               "eval_batch": args.eval_batch, "items": args.items}
    layout = ("" if windows == 1 else f", causal encoder, {windows} targets per window") if args.architecture == "encoder_decoder" \
        else f", {args.architecture.replace('_', ' ')}, {windows} targets per window"
    print(f"| TIGER preset train ({results['parameters_m']:.2f}M params, batch {args.batch}{layout}) | {args.device} "
          f"| {results['train_examples_per_s']:.0f} examples (targets)/s |")
    print(f"| constrained beam search, beam {args.beam} / top-{args.top_k}, {args.items} items, KV cache | "
          f"{args.device} | {results['beam_users_per_s']:.1f} users/s |")
    print(f"| the same without the cache (prefix re-decoded at every level) | {args.device} "
          f"| {results['beam_users_per_s_without_cache']:.1f} users/s (same items: {same_items}) |")
    print(f"load average {results['load_average']}")
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
