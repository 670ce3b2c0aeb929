"""Speed of SASRec training: sequences (windows of max_len + 1 tokens) per second, AdamW step included.

    python bench/bench_sasrec.py                                  # ML-25M preset, CUDA (bf16) when present
    python bench/bench_sasrec.py --device cuda --steps 30 --out /tmp/sasrec.json
    python bench/bench_sasrec.py --device cpu --items 50 --batch 4 --max-len 8 --steps 1   # smoke test

The model and batch come from --config (default configs/sasrec_ml25m.gin: hidden 128, 2 layers, 2 heads,
max_len 200, ffn 512, dropout 0.2, batch 128, AdamW lr 1e-3); --items is the catalogue size (default
62,423, ML-25M's movies), since the real one comes from the data. --batch and --max-len override the
config. Inputs are full windows of random items, so every position is a real transition: the full-catalogue
softmax runs over all batch x max_len positions, the worst case of a real epoch.

Each step is the real training code (`experiments.baselines.train_one_epoch`: host-to-device copy, bf16
autocast on CUDA, loss, backward, gradient clipping, AdamW, `loss.item()`), after --warmup untimed steps.
Prints one markdown table row and, with --out, a JSON file.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import json
import os
import time

import gin
import numpy as np
import torch

from experiments import baselines
from modules.sasrec import SASRec

REPO = pathlib.Path(__file__).resolve().parents[1]
ML25M_ITEMS = 62423


def synthetic_windows(n_windows: int, width: int, n_items: int, seed: int) -> np.ndarray:
    """(n_windows, width) int64 tokens of random real items (1..n_items), no padding."""
    return np.random.default_rng(seed).integers(1, n_items + 1, (n_windows, width), dtype=np.int64)


def train_seconds(model: SASRec, optimizer: torch.optim.Optimizer, windows: np.ndarray, batch_size: int,
                  device: torch.device) -> float:
    """Wall seconds of one `train_one_epoch` pass over `windows` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    baselines.train_one_epoch(model, windows, optimizer, batch_size, epoch=0, seed=0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def preset(config: str, batch: int | None = None, max_len: int | None = None) -> dict:
    """The model config, batch size and AdamW settings bound in the gin file `config` (batch, max_len override)."""
    gin.clear_config()
    gin.parse_config_file(config)
    try:
        model_config = baselines.sasrec_model_config()
        if max_len is not None:
            model_config["max_len"] = max_len
        return {"model": model_config, "batch": batch or gin.query_parameter("train_sasrec.batch_size"),
                "learning_rate": gin.query_parameter("train_sasrec.learning_rate"),
                "weight_decay": gin.query_parameter("train_sasrec.weight_decay")}
    finally:
        gin.clear_config()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=str(REPO / "configs" / "sasrec_ml25m.gin"),
                        help="gin file giving the model, batch size and optimiser")
    parser.add_argument("--items", type=int, default=ML25M_ITEMS, help="catalogue size (full-softmax width)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: train_sasrec.batch_size)")
    parser.add_argument("--max-len", type=int, help="tokens per input sequence (default: SASRec.max_len)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (CUDA kernels, allocator)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}.")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False; pass --device cpu.")

    settings = preset(args.config, args.batch, args.max_len)
    model_config, batch = settings["model"], settings["batch"]
    torch.manual_seed(0)
    model = SASRec(n_items=args.items, **model_config).to(device)
    # The optimiser of train_sasrec (weight decay on matrices and embeddings only).
    optimizer = baselines._make_optimizer(model, settings["learning_rate"], settings["weight_decay"])
    width = model_config["max_len"] + 1  # input window[:, :-1], target window[:, 1:]
    if args.warmup:
        train_seconds(model, optimizer, synthetic_windows(args.warmup * batch, width, args.items, 1), batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = train_seconds(model, optimizer, synthetic_windows(args.steps * batch, width, args.items, 2), batch,
                            device)
    results = {"device": str(device), "threads": args.threads, "load_average": os.getloadavg(),
               "precision": "bf16 autocast" if device.type == "cuda" else "float32",
               "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "train_sequences_per_s": args.steps * batch / seconds,
               "train_positions_per_s": args.steps * batch * model_config["max_len"] / seconds,
               "seconds_per_step": seconds / args.steps, "batch": batch, "steps": args.steps,
               "items": args.items, "config": os.path.relpath(args.config, REPO), **model_config,
               "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                       if device.type == "cuda" else None)}
    print(f"| SASRec train ({results['parameters_m']:.2f}M params, {args.items} items, batch {batch} x "
          f"{model_config['max_len']}, {results['precision']}) | {device} "
          f"| {results['train_sequences_per_s']:.1f} sequences/s |")
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
