"""Convergence curves of several training runs against wall-clock time, from their train.log files.

    python experiments/plot_convergence.py --out docs/results/convergence_ml_small.png \
        "encoder-decoder, 4,000 steps=runs/ml_small/decoder_long/train.log" \
        "decoder-only=runs/ml_small/decoder/train.log" "SASRec=runs/ml_small/baselines/sasrec/train.log"

Each argument is LABEL=PATH. TIGER logs (train_decoder.py) give validation NLL and ndcg@10 per evaluation;
SASRec logs (experiments/07_train_baselines.py) give validation ndcg@10 per epoch. Wall seconds count from
the log's first line (for TIGER: after data loading, when training starts), so a resumed run (two sessions in one log) is not comparable and is refused.
Writes the PNG (NLL and ndcg@10 against wall seconds) and prints the points as a markdown table.
"""
import sys, pathlib
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, so `experiments` imports

import argparse
import datetime as dt
import re

from experiments import artifacts

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
TIGER_POINT = re.compile(r"step (\d+) validation .*?ndcg@10=([\d.]+) nll=([\d.]+)")
SASREC_POINT = re.compile(r"epoch (\d+): .*?valid .*?ndcg@10 ([\d.]+)")


def read_curve(path: pathlib.Path) -> list[dict]:
    """[{seconds, step, ndcg@10, nll (None for SASRec)}] from one train.log."""
    lines = path.read_text().splitlines()
    stamped = [(STAMP.match(line), line) for line in lines]
    stamped = [(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), line) for m, line in stamped if m]
    if not stamped:
        raise SystemExit(f"{path}: no timestamped log lines; pass a train.log written by train_decoder.py or "
                         "experiments/07_train_baselines.py.")
    # One line per session: TIGER's popularity reference (logged once training starts), SASRec's device line.
    starts = [line for _, line in stamped if "reference: most-popular NLL" in line or "device:" in line]
    if len(starts) > 1:
        raise SystemExit(f"{path} holds {len(starts)} sessions (a resumed run): its wall times are not one run's; "
                         "plot an uninterrupted run.")
    start = stamped[0][0]
    points = []
    for when, line in stamped:
        if match := TIGER_POINT.search(line):
            points.append({"seconds": (when - start).total_seconds(), "step": int(match.group(1)),
                           "ndcg@10": float(match.group(2)), "nll": float(match.group(3))})
        elif match := SASREC_POINT.search(line):
            points.append({"seconds": (when - start).total_seconds(), "step": int(match.group(1)),
                           "ndcg@10": float(match.group(2)), "nll": None})
    if not points:
        raise SystemExit(f"{path}: no validation lines found (is it a finished or running train.log?).")
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/train.log")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    curves = {}
    for spec in args.runs:
        label, sep, path = spec.rpartition("=")  # the last '=': labels may hold one ("H=20")
        if not sep:
            raise SystemExit(f"{spec!r}: write each run as LABEL=PATH.")
        if not pathlib.Path(path).is_file():
            raise SystemExit(f"{path}: no such log (run {label!r}); give the train.log of a train_decoder.py or "
                             "experiments/07_train_baselines.py run.")
        curves[label] = read_curve(pathlib.Path(path))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (nll_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, points in curves.items():
        with_nll = [p for p in points if p["nll"] is not None]
        if with_nll:
            nll_ax.plot([p["seconds"] for p in with_nll], [p["nll"] for p in with_nll], marker="o", label=label)
        ndcg_ax.plot([p["seconds"] for p in points], [p["ndcg@10"] for p in points], marker="o", label=label)
    nll_ax.set(xlabel="wall seconds", ylabel="nats (lower is better)", title="validation NLL of the target item")
    ndcg_ax.set(xlabel="wall seconds", ylabel="ndcg@10", title="validation ndcg@10")
    nll_ax.legend(), ndcg_ax.legend()
    artifacts.save_figure(args.out, fig)
    print("| run | step | wall s | validation NLL | validation ndcg@10 |\n|---|---:|---:|---:|---:|")
    for label, points in curves.items():
        for p in points:
            nll = f"{p['nll']:.3f}" if p["nll"] is not None else ""
            print(f"| {label} | {p['step']} | {p['seconds']:.0f} | {nll} | {p['ndcg@10']:.4f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
