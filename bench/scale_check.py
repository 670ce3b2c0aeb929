"""Scale check: every pipeline step at ML-25M size, with tiny iteration counts (`make scale-check`).

    python bench/scale_check.py [--work /tmp/scale_check] [--ratings 25000095 --users 162541]
                                [--rqvae-steps 300 --tiger-steps 5 --sasrec-steps 5 --eval-users 512]

Builds, once (cached in --work), data of ML-25M's size and schema: ratings.csv as `bench/bench_prepare.py`
writes it (25,000,095 ratings, 162,541 users, the real 62,423 movieIds of ml-25m's links.csv), tags.csv
(1.09M rows), a tag genome of the real width (genome-scores.csv, 13,816 movies x 1,128 tags) and synthetic
poster features of ResNet50's width (2,048). Then runs each step in its own process, with the ML-25M
presets (configs/*_ml25m.gin) and their real batch sizes:

    prepare   experiments/02_prepare_interactions.py
    fusion    experiments/05_fuse_item_features.py, blocks genres, year, tags, genome, poster
    rqvae     train_rqvae.py, --rqvae-steps steps (the preset trains 25,000)
    tiger     --tiger-steps steps of train_decoder's training step (the preset's layout and batch, 256) and
              beam search of --eval-users validation users (the preset's eval batch)
    sasrec    --sasrec-steps steps of SASRec training (batch 128 windows of 201 items) and full-catalogue
              scoring of --eval-users users
    popularity  most-popular counts and rankings of every user

and records per step the wall time, the peak RSS of its process (`os.wait4`), the measured throughput and
the time the full preset would take at that throughput on this machine (all 162,541 users for evaluation).
Writes WORK/scale_check.json and WORK/scale_check.md; BENCHMARKS.md records a run. Every step must fit in
24 GiB: a step over --max-rss-gib fails the check (exit 1).
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments`/`modules` import

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GIN = {name: str(REPO / "configs" / f"{name}_ml25m.gin") for name in ("rqvae", "decoder", "sasrec")}
GENOME_TAGS, GENOME_MOVIES, TAG_ROWS, POSTER_DIM = 1128, 13_816, 1_093_360, 2048
MARKER = "SCALE_CHECK_FIGURES "  # prefix of the one stdout line a step child reports its figures on


# ----------------------------------------------------------------------------------------------------
# Synthetic inputs of the real sizes
def write_content(data: Path, run: Path, seed: int = 0) -> None:
    """tags.csv, genome-tags.csv, genome-scores.csv in DATA and poster features in RUN/poster_features (once)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    rng = np.random.default_rng(seed)
    movie_ids = np.load(run / "item_ids.npy")
    if not (data / "genome-scores.csv").is_file():
        genome_ids = np.sort(rng.choice(movie_ids, GENOME_MOVIES, replace=False))
        pacsv.write_csv(pa.table({"tagId": np.arange(1, GENOME_TAGS + 1),
                                  "tag": [f"genome tag {i}" for i in range(1, GENOME_TAGS + 1)]}), data / "genome-tags.csv")
        table = pa.table({"movieId": np.repeat(genome_ids, GENOME_TAGS),
                          "tagId": np.tile(np.arange(1, GENOME_TAGS + 1), GENOME_MOVIES),
                          "relevance": rng.random(GENOME_MOVIES * GENOME_TAGS, dtype=np.float32)})
        pacsv.write_csv(table, data / "genome-scores.csv.tmp")
        os.replace(data / "genome-scores.csv.tmp", data / "genome-scores.csv")
    if not (data / "tags.csv").is_file():
        vocabulary = np.array([f"tag {i}" for i in range(5000)])
        pacsv.write_csv(pa.table({"userId": rng.integers(1, 162_542, TAG_ROWS), "movieId": rng.choice(movie_ids, TAG_ROWS),
                                  "tag": vocabulary[rng.zipf(1.5, TAG_ROWS) % 5000],
                                  "timestamp": rng.integers(10 ** 9, 1_574_327_703, TAG_ROWS)}), data / "tags.csv.tmp")
        os.replace(data / "tags.csv.tmp", data / "tags.csv")
    posters = run / "poster_features"
    if not (posters / "meta.json").is_file():
        from experiments import artifacts
        posters.mkdir(parents=True, exist_ok=True)
        artifacts.save_npy(posters / "features.npy", rng.random((len(movie_ids), POSTER_DIM), dtype=np.float32))
        artifacts.save_npy(posters / "movie_ids.npy", movie_ids)
        artifacts.save_npy(posters / "has_poster.npy", rng.random(len(movie_ids)) < 0.95)
        artifacts.save_json(posters / "meta.json", {"backbone": "synthetic (bench/scale_check.py)", "dim": POSTER_DIM,
                                                    "weights": "synthetic uniform noise, for sizes only"})


# ----------------------------------------------------------------------------------------------------
# In-process steps (run as `python bench/scale_check.py --step NAME`), each printing one JSON line
def step_tiger(run: Path, steps: int, eval_users: int) -> dict:
    import gin
    import torch
    import train_decoder
    from experiments.decoder_diagnostics import gin_value
    gin.parse_config_files_and_bindings([GIN["decoder"]], [])
    batch_size, eval_batch = gin_value("train_decoder.batch_size"), gin_value("train_decoder.eval_batch_size")
    architecture, windows = gin_value("train_decoder.architecture"), gin_value("train_decoder.targets_per_window")
    started = time.perf_counter()
    data = train_decoder.load_data(run, run / "rqvae", None, False, 0, gin_value("train_decoder.max_history"),
                                   gin_value("train_decoder.n_user_buckets"), windows, gin_value("train_decoder.max_targets_per_user"))
    load_seconds = time.perf_counter() - started
    model = train_decoder.ARCHITECTURES[architecture](vocab=data.vocab, max_history=data.max_history)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    runtime = train_decoder.Runtime(device=torch.device("cpu"))
    order = train_decoder.DataOrder(len(data.train_positions), 0)
    train_decoder.train_step(model, optimizer, scheduler, data, order.batch(0, batch_size), 1.0, runtime)  # warm-up
    started = time.perf_counter()
    for step in range(1, steps + 1):
        train_decoder.train_step(model, optimizer, scheduler, data, order.batch(step, batch_size), 1.0, runtime)
    step_seconds = (time.perf_counter() - started) / steps
    trie = train_decoder.SemanticIdTrie(torch.as_tensor(data.semantic_ids), data.vocab.codebook_sizes)
    users = np.sort(data.valid_pos[np.random.default_rng(0).choice(len(data.valid_pos), eval_users, replace=False)])
    started = time.perf_counter()
    train_decoder.evaluate(model, data, trie, users, runtime, beam_width=gin_value("train_decoder.beam_width"),
                           top_k=gin_value("train_decoder.top_k"), batch_size=min(eval_batch, eval_users), desc="eval")
    eval_seconds = time.perf_counter() - started
    iterations, n_users = gin_value("train_decoder.iterations"), len(data.valid_pos)
    # Users beam-searched by the preset: every validation during training (a sample of valid_max_users), then
    # valid, test and the unconstrained test pass of `finish` over all users.
    sample = min(gin_value("train_decoder.valid_max_users") or n_users, n_users)
    searched = iterations // gin_value("train_decoder.eval_every") * sample + 3 * n_users
    rate = eval_users / eval_seconds
    return {"architecture": architecture, "load_seconds": load_seconds, "training_windows": len(data.train_positions),
            "batch": batch_size, "targets_per_window": windows, "seconds_per_step": step_seconds,
            "windows_per_s": batch_size / step_seconds, "preset_steps": iterations,
            "projected_training_hours": iterations * step_seconds / 3600, "eval_batch": min(eval_batch, eval_users),
            "eval_users_per_s": rate, "users": n_users, "users_searched_by_preset": searched,
            "projected_eval_hours": searched / rate / 3600}


def step_sasrec(run: Path, steps: int, eval_users: int) -> dict:
    import gin
    import torch
    from experiments import baselines
    from modules.sasrec import SASRec, training_windows
    gin.parse_config_files_and_bindings([GIN["sasrec"]], [])
    interactions, n_items, split = baselines.load_run(run)
    config = baselines.sasrec_model_config()
    batch_size = gin.query_parameter("train_sasrec.batch_size")
    started = time.perf_counter()
    windows = training_windows(interactions.item_index, split.starts, split.valid_pos, config["max_len"], None)
    window_seconds = time.perf_counter() - started
    torch.manual_seed(0)
    model = SASRec(n_items=n_items, **config)
    optimizer = baselines._make_optimizer(model, 1e-3, 0.01)
    order = np.random.default_rng(0).permutation(len(windows))

    def train_step(i):
        batch = torch.from_numpy(windows[order[i * batch_size:(i + 1) * batch_size]])
        loss = model.train().loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step(0)
    started = time.perf_counter()
    for i in range(1, steps + 1):
        train_step(i)
    step_seconds = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    rows = np.sort(np.random.default_rng(0).choice(interactions.n_users, eval_users, replace=False))
    model.eval()
    ranker = baselines.sasrec_ranker(model, interactions.item_index, torch.device("cpu"), 10)
    ends = split.valid_pos[rows]
    ranker(split.starts[rows], ends, [interactions.item_index[s:e] for s, e in zip(split.starts[rows], ends)])
    eval_seconds = time.perf_counter() - started
    epochs = gin.query_parameter("train_sasrec.epochs")
    steps_per_epoch = -(-len(windows) // batch_size)
    return {"windows": len(windows), "window_seconds": window_seconds, "batch": batch_size,
            "seconds_per_step": step_seconds, "sequences_per_s": batch_size / step_seconds,
            "steps_per_epoch": steps_per_epoch, "projected_epoch_hours": steps_per_epoch * step_seconds / 3600,
            "preset_epochs_max": epochs, "eval_users_per_s": eval_users / eval_seconds,
            "projected_eval_minutes_all_users": 2 * interactions.n_users / (eval_users / eval_seconds) / 60}


def step_popularity(run: Path) -> dict:
    from experiments import baselines
    started = time.perf_counter()
    result = baselines.evaluate_popularity(run)
    return {"seconds": time.perf_counter() - started, "users": result["n_test_users"],
            "test_recall@10": result["test"]["recall@10"]}


# ----------------------------------------------------------------------------------------------------
# Orchestration
def run_child(name: str, args: list[str], log_dir: Path) -> dict:
    """Run `python args` in a fresh process; its wall time, peak RSS (GiB, os.wait4) and reported figures."""
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"scale check: step {name} failed (exit {os.waitstatus_to_exitcode(status)}); see {log_path}")
    figures = next((json.loads(line[len(MARKER):]) for line in reversed(out.splitlines()) if line.startswith(MARKER)), {})
    return {"step": name, "wall_seconds": wall, "peak_rss_gib": usage.ru_maxrss / 2 ** 20} | figures


def markdown(results: list[dict], args) -> str:
    lines = [f"# Scale check at ML-25M size ({args.ratings:,} ratings, {args.users:,} users)", "",
             f"`python bench/scale_check.py --work {args.work}`, load average at the start {results[0]['load']}.", "",
             "| step | wall | peak RSS | measured | projected for the full preset on this machine |",
             "|---|---:|---:|---|---|"]
    for r in results:
        measured, projected = describe(r)
        lines.append(f"| {r['step']} | {r['wall_seconds']:.1f} s | {r['peak_rss_gib']:.2f} GiB | {measured} | {projected} |")
    return "\n".join(lines) + "\n"


def describe(r: dict) -> tuple[str, str]:
    """Measured throughput and projection of one step, in words."""
    if r["step"] == "rqvae":
        return (f"{r['steps']} steps, {r['items_per_s']:,.0f} items/s",
                f"{r['preset_steps']:,} steps: {r['projected_hours']:.2f} h")
    if r["step"] == "tiger":
        return (f"{r['architecture']}, batch {r['batch']}: {r['windows_per_s']:.1f} windows/s; beam search "
                f"{r['eval_users_per_s']:.1f} users/s (batch {r['eval_batch']})",
                f"{r['preset_steps']:,} steps: {r['projected_training_hours']:.0f} h; the preset's "
                f"{r['users_searched_by_preset']:,} beam-searched users: {r['projected_eval_hours']:.1f} h")
    if r["step"] == "sasrec":
        return (f"batch {r['batch']} x 200: {r['sequences_per_s']:.1f} sequences/s; scoring {r['eval_users_per_s']:.0f} users/s",
                f"one epoch ({r['steps_per_epoch']:,} steps): {r['projected_epoch_hours']:.1f} h (preset: up to "
                f"{r['preset_epochs_max']} epochs, early stopping); valid + test: {r['projected_eval_minutes_all_users']:.1f} min")
    if r["step"] == "popularity":
        return f"{r['users']:,} users ranked", "as measured"
    return "", "as measured"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale_check"))
    parser.add_argument("--ratings", type=int, default=25_000_095)
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--rqvae-steps", type=int, default=300)
    parser.add_argument("--tiger-steps", type=int, default=5)
    parser.add_argument("--sasrec-steps", type=int, default=5)
    parser.add_argument("--eval-users", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-rss-gib", type=float, default=24.0)
    parser.add_argument("--step", choices=["tiger", "sasrec", "popularity"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    data, run = args.work / "data", args.work / "run"
    if args.step:  # a child process
        import torch
        torch.set_num_threads(args.threads)
        figures = (step_tiger(run, args.tiger_steps, args.eval_users) if args.step == "tiger" else
                   step_sasrec(run, args.sasrec_steps, args.eval_users) if args.step == "sasrec" else step_popularity(run))
        print(MARKER + json.dumps(figures))
        return

    from bench.bench_prepare import make_ml25m_like
    log_dir = args.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"ratings": args.ratings, "users": args.users}
    sizes_file = data / "scale_check_sizes.json"
    if sizes_file.is_file() and json.loads(sizes_file.read_text()) != sizes:
        raise SystemExit(f"{data} holds data of other sizes ({sizes_file.read_text().strip()}, asked {sizes}): "
                         "pass another --work, or delete that folder.")
    if (data / "ratings.csv").is_file() and not sizes_file.is_file():
        raise SystemExit(f"{data}/ratings.csv exists without {sizes_file.name}: its sizes are unknown; pass another "
                         "--work, or delete that folder.")
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"scale check in {args.work}; load average {load}", flush=True)
    make_ml25m_like(data, args.ratings, args.users)
    sizes_file.write_text(json.dumps(sizes) + "\n")
    threads = ["--threads", str(args.threads)]
    results = [run_child("prepare", ["experiments/02_prepare_interactions.py", "--data", str(data), "--run", str(run),
                                     "--overwrite"], log_dir)]
    write_content(data, run)
    results.append(run_child("fusion", ["experiments/05_fuse_item_features.py", GIN["rqvae"], "--run", str(run),
                                        "--data", str(data), "--posters-features", str(run / "poster_features"),
                                        "--blocks", "genres,year,tags,genome,poster", "--overwrite"], log_dir))
    rqvae = run_child("rqvae", ["train_rqvae.py", GIN["rqvae"], "--run", str(run), "--overwrite", "--allow-collapsed",
                                "--gin_param", f"train_rqvae.iterations = {args.rqvae_steps}",
                                "--gin_param", f"train_rqvae.eval_every = {args.rqvae_steps}",
                                "--gin_param", f"train_rqvae.checkpoint_every = {args.rqvae_steps}"], log_dir)
    results.append(rqvae | rqvae_throughput(run, args.rqvae_steps))
    for name in ("tiger", "sasrec", "popularity"):
        results.append(run_child(name, ["bench/scale_check.py", "--work", str(args.work), "--step", name, *threads,
                                        "--tiger-steps", str(args.tiger_steps), "--sasrec-steps", str(args.sasrec_steps),
                                        "--eval-users", str(args.eval_users)], log_dir))
        print(f"{name}: {results[-1]['wall_seconds']:.1f} s, peak {results[-1]['peak_rss_gib']:.2f} GiB", flush=True)
    results[0]["load"] = load
    (args.work / "scale_check.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, args)
    (args.work / "scale_check.md").write_text(table)
    print(table)
    over = [r["step"] for r in results if r["peak_rss_gib"] > args.max_rss_gib]
    if over:
        raise SystemExit(f"scale check failed: {', '.join(over)} went over {args.max_rss_gib} GiB of RAM")


def rqvae_throughput(run: Path, steps: int) -> dict:
    """Items/s of the RQ-VAE steps: the median of the per-window rates train_rqvae.py logs (log.jsonl)."""
    import gin
    import train_rqvae  # registers the configurables the config binds
    gin.parse_config_files_and_bindings([GIN["rqvae"]], [])
    batch, preset = gin.query_parameter("train_rqvae.batch_size"), gin.query_parameter("train_rqvae.iterations")
    gin.clear_config()
    records = [json.loads(line) for line in (run / "rqvae" / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["items_per_s"] for r in records if r.get("items_per_s")]
    if not rates:
        raise SystemExit(f"{run / 'rqvae' / 'log.jsonl'}: no items_per_s records to measure RQ-VAE throughput from.")
    per_step = batch / float(np.median(rates))
    return {"steps": steps, "batch": batch, "items_per_s": batch / per_step, "preset_steps": preset,
            "projected_hours": preset * per_step / 3600}


if __name__ == "__main__":
    main()
