"""Our TIGER decoder side by side with Hugging Face T5 (`python bench/bench_decoder.py --compare-hf`).

The closest public implementation (EdoardoBotta/RQ-VAE-Recommender) trains a `transformers`
T5ForConditionalGeneration. This builds one at our preset's sizes (d_model 128, 6 heads x 64, d_ff 1024,
4 + 4 layers, dropout 0.1, the same token vocabulary, 81 encoder tokens, 4 decoder tokens) and times, in
one process and interleaved so that both see the same load:

- training: (history, next item) examples per second, AdamW step included. Ours is timed in the paper's
  layout (one target per encoder pass, the like-for-like figure, `train_ratio`) and in the decoder-only
  layouts (TigerLM, the token stream, and TigerItemLM, the item stream of the ml_small pipeline preset:
  the last 20 items of a 21-item window per causal pass, `train_ratio_lm` and `train_ratio_item`; their
  examples see 1..20 history items instead of 20);
- decoding: users per second for the top 10 of a beam of 20 constrained to real IDs: ours with the trie
  and KV cache (`modules.beam_search`), T5 with `generate(num_beams=20, prefix_allowed_tokens_fn=...)`.

Both searches are exact when the beam covers the catalogue; on a catalogue of 15 items each one's top-10
is checked against its own exhaustive ranking (`exact_top10_ours`, `exact_top10_hf`). `transformers` is a
requirement of the repository since the text block (sentence-transformers); bench/requirements-hf.txt pins
the same version.
Prints a markdown table and one JSON line with `train_ratio` and `decode_ratio`.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import torch

from bench.bench_decoder import history_tokens
from modules.beam_search import SemanticIdTrie, beam_search, exhaustive_item_scores
from modules.sequences import BOS_TOKEN, PAD_TOKEN, Vocabulary, random_semantic_ids, semantic_id_tokens
from modules.tiger import Tiger
from modules.tiger_lm import TigerItemLM, TigerLM

CODEBOOK_SIZES = (256, 256, 256, 8)
HISTORY = 20
SIZES = dict(embed_dim=128, attn_dim=384, n_heads=6, mlp_dim=1024, dropout=0.1)


def hf_t5(vocab: Vocabulary):
    """T5ForConditionalGeneration at our preset's sizes over our token vocabulary (PAD 0, BOS as decoder start)."""
    try:
        from transformers import T5Config, T5ForConditionalGeneration
    except ImportError as error:
        raise SystemExit("--compare-hf needs transformers: pip install -r requirements.txt") from error
    config = T5Config(vocab_size=vocab.size, d_model=SIZES["embed_dim"], d_kv=SIZES["attn_dim"] // SIZES["n_heads"],
                      d_ff=SIZES["mlp_dim"], num_layers=4, num_decoder_layers=4, num_heads=SIZES["n_heads"],
                      dropout_rate=SIZES["dropout"], pad_token_id=PAD_TOKEN, eos_token_id=PAD_TOKEN,
                      decoder_start_token_id=BOS_TOKEN, tie_word_embeddings=False)
    return T5ForConditionalGeneration(config)


def prefix_table(item_tokens: np.ndarray) -> tuple[dict, dict]:
    """The real IDs as HF's constraint wants them: allowed next tokens per generated prefix, and item per full ID."""
    allowed: dict[tuple, set] = {}
    for row in item_tokens.tolist():
        for level in range(len(row)):
            allowed.setdefault(tuple(row[:level]), set()).add(row[level])
    return {prefix: sorted(tokens) for prefix, tokens in allowed.items()}, {tuple(row): i for i, row in enumerate(item_tokens.tolist())}


def hf_top_k(model, src: torch.Tensor, allowed: dict, item_of: dict, beam: int, top_k: int, n_levels: int) -> list[list[int]]:
    """T5's constrained beam search: top_k item rows per input (-1 where a returned ID is no item)."""
    def allowed_tokens(batch_id, input_ids):
        return allowed.get(tuple(input_ids[1:].tolist()), [PAD_TOKEN])
    out = model.generate(input_ids=src, attention_mask=(src != PAD_TOKEN).long(), num_beams=beam,
                         num_return_sequences=top_k, max_new_tokens=n_levels, min_new_tokens=n_levels,
                         prefix_allowed_tokens_fn=allowed_tokens, do_sample=False, early_stopping=False,
                         length_penalty=0.0)
    rows = out[:, 1:1 + n_levels].tolist()
    return [[item_of.get(tuple(r), -1) for r in rows[b * top_k:(b + 1) * top_k]] for b in range(len(src))]


@torch.no_grad()
def hf_exhaustive_top_k(model, src: torch.Tensor, item_tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, top_k) item rows by the sum of T5's per-level log-softmax (over its whole vocabulary, as generate scores)."""
    batch, n_items = len(src), len(item_tokens)
    labels = item_tokens.repeat(batch, 1)
    logits = model(input_ids=src.repeat_interleave(n_items, 0), attention_mask=(src != PAD_TOKEN).long().repeat_interleave(n_items, 0),
                   labels=labels).logits
    scores = logits.log_softmax(-1).gather(2, labels[:, :, None]).squeeze(2).sum(1).view(batch, n_items)
    return scores.topk(top_k, dim=1).indices


def example_gflop(loss_of_rows, rows: int = 4) -> float:
    """GFLOP of forward + backward per example (torch's FlopCounterMode: matmuls and attention). The gradients it
    leaves are cleared by the timed steps, which zero them before their backward."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss_of_rows(rows).backward()
    return counter.get_total_flops() / rows / 1e9


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def compare(args) -> dict:
    """Run the side-by-side measurement; print the table and the JSON line; return the figures."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vocab = Vocabulary(CODEBOOK_SIZES, n_user_buckets=2000)
    semantic_ids = random_semantic_ids(args.items, CODEBOOK_SIZES, seed=0)
    item_tokens = semantic_id_tokens(semantic_ids, vocab)
    n_levels = vocab.n_levels

    ours = Tiger(vocab, max_history=HISTORY, n_layers=8, **SIZES)
    lm = TigerLM(vocab, max_history=HISTORY, n_layers=8, **SIZES)
    item = TigerItemLM(vocab, max_history=HISTORY, n_layers=8, **SIZES)
    hf = hf_t5(vocab)
    models = {"ours": ours, "lm": lm, "item": item, "hf": hf}
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    window = rng.integers(0, args.items, (args.batch, HISTORY + 1))
    src = history_tokens(vocab, item_tokens, window[:, :HISTORY], rng)
    target = torch.as_tensor(semantic_ids[window[:, -1]])
    labels = torch.as_tensor(item_tokens[window[:, -1]])
    lm_targets = torch.as_tensor(semantic_ids[window[:, 1:]])
    lm_visible = torch.arange(1, HISTORY + 1).repeat(args.batch, 1)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    # --bf16: every model's training forward under CPU bf16 autocast, decoding in float32. Not quite like for
    # like: our code heads and losses stay float32 inside it (modules/tiger.py level_logits), T5's lm_head runs
    # in bf16 (its loss is float32)
    precision = "bf16 autocast" if getattr(args, "bf16", False) else "float32"

    def step(name, loss_fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
                loss = loss_fn()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
        return run

    steps = {"ours": step("ours", lambda: ours.train()(src, target)),
             "lm": step("lm", lambda: lm.train()(src, lm_targets, lm_visible)),
             "item": step("item", lambda: item.train()(src, lm_targets, lm_visible)),
             "hf": step("hf", lambda: hf.train()(input_ids=src, attention_mask=(src != PAD_TOKEN).long(), labels=labels).loss)}
    # the work of one paper-layout example, forward + backward, counted on 4 rows: equal work means the
    # training rates compare the implementations, not the models
    gflop = {"ours": example_gflop(lambda b: ours.train()(src[:b], target[:b])),
             "hf": example_gflop(lambda b: hf.train()(input_ids=src[:b], attention_mask=(src[:b] != PAD_TOKEN).long(),
                                                      labels=labels[:b]).loss)}
    seconds = {name: 0.0 for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.eval_repeats):  # interleaved rounds
        for name, fn in steps.items():
            seconds[name] += timed(fn, args.steps)
    per_step = {name: s / args.eval_repeats for name, s in seconds.items()}
    train_rate = {"ours": args.batch / per_step["ours"], "lm": args.batch * HISTORY / per_step["lm"],
                  "item": args.batch * HISTORY / per_step["item"], "hf": args.batch / per_step["hf"]}

    ours.eval(), hf.eval()
    trie = SemanticIdTrie(torch.as_tensor(semantic_ids), CODEBOOK_SIZES)
    allowed, item_of = prefix_table(item_tokens)
    eval_src = history_tokens(vocab, item_tokens, rng.integers(0, args.items, (args.eval_batch, HISTORY)), rng)
    decode_seconds = {"ours": 0.0, "hf": 0.0}
    for _ in range(args.eval_repeats):
        decode_seconds["ours"] += timed(lambda: beam_search(ours, eval_src, trie, args.beam, args.top_k), 1)
        with torch.no_grad():
            decode_seconds["hf"] += timed(lambda: hf_top_k(hf, eval_src, allowed, item_of, args.beam, args.top_k, n_levels), 1)
    decode_rate = {name: args.eval_batch * args.eval_repeats / s for name, s in decode_seconds.items()}
    exact = exactness_check(ours, hf, vocab, rng, args.beam, args.top_k)

    results = {"device": "cpu", "threads": args.threads, "load_average": os.getloadavg(), "batch": args.batch,
               "train_precision": precision, "train_gflop_per_example": gflop,
               "train_gflop_per_s": {name: gflop[name] * train_rate[name] for name in gflop},
               "parameters_m": counts, "train_examples_per_s": train_rate, "beam_users_per_s": decode_rate,
               "train_ratio": train_rate["ours"] / train_rate["hf"], "train_ratio_lm": train_rate["lm"] / train_rate["hf"],
               "train_ratio_item": train_rate["item"] / train_rate["hf"],
               "decode_ratio": decode_rate["ours"] / decode_rate["hf"], "beam": args.beam, "top_k": args.top_k,
               "eval_batch": args.eval_batch, "items": args.items, "rounds": args.eval_repeats} | exact
    print(f"| model | parameters | train examples/s (batch {args.batch}, {precision}) | constrained beam {args.beam} / top-{args.top_k}, users/s |")
    print("|---|---:|---:|---:|")
    print(f"| ours, paper layout (Tiger), {gflop['ours']:.3f} GFLOP per example | {counts['ours']:.2f}M | "
          f"{train_rate['ours']:.1f} | {decode_rate['ours']:.1f} |")
    print(f"| ours, decoder-only (TigerLM, 20 targets per window) | {counts['lm']:.2f}M | {train_rate['lm']:.1f} | |")
    print(f"| ours, item stream (TigerItemLM, 20 targets per window) | {counts['item']:.2f}M | {train_rate['item']:.1f} | |")
    print(f"| transformers T5ForConditionalGeneration, {gflop['hf']:.3f} GFLOP per example | {counts['hf']:.2f}M | "
          f"{train_rate['hf']:.1f} | {decode_rate['hf']:.1f} |")
    print(json.dumps({k: results[k] for k in ("train_precision", "train_ratio", "train_ratio_lm", "train_ratio_item", "decode_ratio",
                                               "exact_top10_ours", "exact_top10_hf")}))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def exactness_check(ours: Tiger, hf, vocab: Vocabulary, rng, beam: int, top_k: int, n_items: int = 15) -> dict:
    """On a catalogue smaller than the beam both searches are exact: each top-10 equals its own exhaustive one."""
    semantic_ids = random_semantic_ids(n_items, CODEBOOK_SIZES, seed=1)
    item_tokens = semantic_id_tokens(semantic_ids, vocab)
    src = history_tokens(vocab, item_tokens, rng.integers(0, n_items, (4, HISTORY)), rng)
    ours_items = beam_search(ours, src, SemanticIdTrie(torch.as_tensor(semantic_ids), CODEBOOK_SIZES), beam, top_k).items
    ours_exact = exhaustive_item_scores(ours, src, torch.as_tensor(semantic_ids)).topk(top_k).indices
    allowed, item_of = prefix_table(item_tokens)
    with torch.no_grad():
        hf_items = torch.tensor(hf_top_k(hf, src, allowed, item_of, beam, top_k, vocab.n_levels))
    hf_exact = hf_exhaustive_top_k(hf, src, torch.as_tensor(item_tokens), top_k)
    return {"exact_top10_ours": bool(torch.equal(ours_items, ours_exact)),
            "exact_top10_hf": bool(torch.equal(hf_items, hf_exact))}
