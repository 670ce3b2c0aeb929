"""Merge the outputs of bench/gpu_check.sh into OUT/gpu_check.json and OUT/gpu_check.md.

    python bench/gpu_check_report.py OUT_DIR      # exit 0 when every step passed, 1 otherwise
    python bench/gpu_check_report.py --write-env OUT_DIR/env.json   # gpu_check.sh's env step

gpu_check.sh appends one line per step to OUT/steps.tsv (name, exit code, seconds, time limit, command)
and each step writes its own result file into OUT (tests.txt, tiger.json, ...). Every expected step ends in
the report: with its figures when it exited 0 and left readable results, else as one FAILED row that says
why (its exit code, a timeout, no results, or never run), so a failure can never pass as a quiet blank.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STEPS_FILE = "steps.tsv"
REPORT_JSON, REPORT_MD = "gpu_check.json", "gpu_check.md"
TIMEOUT_EXIT_CODES = (124, 137)  # coreutils `timeout`: 124 after TERM, 137 after the follow-up KILL


class MissingResult(ValueError):
    """A step exited 0 but its result file is absent, unreadable or lacks a figure."""


def _tests(summary: str) -> list[tuple]:
    return [("CUDA tests (tests/test_cuda.py, test_beam_search.py, test_tiger.py)", summary, "pytest")]


def _tiger(r: dict) -> list[tuple]:
    precision = "bf16 autocast" if r["device"].startswith("cuda") else "float32"  # as bench_decoder.py runs
    return [(f"TIGER training (TIGER preset, {r['parameters_m']:.2f}M params, batch {r['train_batch']}, "
             f"{r['items']:,} items, {precision})", r["train_examples_per_s"], "examples/s"),
            (f"TIGER constrained beam search (beam {r['beam']} / top-{r['top_k']}, {r['eval_batch']} users per "
             f"call, {r['items']:,} items, KV cache)", r["beam_users_per_s"], "users/s"),
            ("TIGER beam search without the KV cache", r["beam_users_per_s_without_cache"], "users/s"),
            ("cached and uncached beam search return the same items", r["cached_equals_uncached_items"], "")]


def _sasrec(r: dict) -> list[tuple]:
    return [(f"SASRec training ({r['parameters_m']:.2f}M params, {r['items']:,} items, batch {r['batch']} x "
             f"{r['max_len']}, full softmax, AdamW, {r['precision']})", r["train_sequences_per_s"], "sequences/s")]


def _rqvae(r: dict) -> list[tuple]:
    # train_rqvae.train_step runs without autocast: the RQ-VAE trains in float32 on every device.
    return [(f"RQ-VAE training ({r['items']:,} items x {r['features']} features, batch {r['batch_size']}, "
             f"float32)", r["items_per_s"], "items/s")]


def _posters(r: dict) -> list[tuple]:
    rows = []
    for row in r["rows"]:
        name = f"poster features, {row['backbone']} ({row['weights']} weights), {r['image_size']} px"
        rows += [(f"{name}, forward only ({r['precision']})", row["forward"], "images/s"),
                 (f"{name}, full pipeline (JPEG decoding in {r['workers']} workers + forward)", row["pipeline"],
                  "images/s")]
    if not rows:
        raise MissingResult("no backbone rows")
    return rows


def read_steps(out_dir: Path) -> dict[str, dict]:
    """{name: {"exit_code", "seconds", "timeout_s", "command"}} from OUT/steps.tsv (a later line wins)."""
    path = out_dir / STEPS_FILE
    steps = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            name, exit_code, seconds, timeout_s, command = line.split("\t", 4)
            steps[name] = {"exit_code": int(exit_code), "seconds": int(seconds), "timeout_s": int(timeout_s),
                           "command": command}
    return steps


def load_json_result(path: Path) -> dict:
    """The JSON object in `path`: the whole file, or else its last line that is one (a bench that prints
    its result as a JSON line after other output)."""
    if not path.is_file():
        raise MissingResult(f"{path.name} was not written")
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.splitlines()):
            if line.lstrip().startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
    raise MissingResult(f"{path.name} holds no JSON object")


def pytest_summary(path: Path) -> str:
    """pytest's final summary ('12 passed, 1 skipped in 3.2s'), without the surrounding '='."""
    if not path.is_file():
        raise MissingResult(f"{path.name} was not written")
    for line in reversed(path.read_text().splitlines()):
        if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran", line):
            return line.strip(" =")
    raise MissingResult(f"{path.name} has no pytest summary line")


@dataclass(frozen=True)
class Step:
    """One step of gpu_check.sh: its name in steps.tsv, its result file in OUT, how to read that file,
    and how to turn what was read into (measurement, value, unit) rows (None: no rows, as for env)."""

    name: str
    title: str
    result_file: str
    read: Callable[[Path], object]
    measurements: Callable[[object], list[tuple]] | None


STEPS = (
    Step("env", "environment (nvidia-smi, torch, CUDA)", "env.json", load_json_result, None),
    Step("tests", "CUDA tests", "tests.txt", pytest_summary, _tests),
    Step("tiger", "TIGER training and beam search", "tiger.json", load_json_result, _tiger),
    Step("sasrec", "SASRec training", "sasrec.json", load_json_result, _sasrec),
    Step("rqvae", "RQ-VAE training", "rqvae.json", load_json_result, _rqvae),
    Step("posters", "poster features", "posters.json", load_json_result, _posters),
)


def _failure(record: dict | None, detail: str | None) -> str:
    """Why a step counts as failed, in words."""
    if record is None:
        return "FAILED: not run (no line in steps.tsv: the script stopped before this step)"
    code = record["exit_code"]
    if code in TIMEOUT_EXIT_CODES:
        reason = f"FAILED: timed out after {record['timeout_s']} s (exit {code})"
    elif code:
        reason = f"FAILED: exit {code}"
    else:
        reason = "FAILED: exit 0 but no results"
    return f"{reason}; {detail}" if detail else reason


def build_report(out_dir: Path) -> dict:
    """The merged report: ok, env, one entry per step, and the measurement rows of the table."""
    records = read_steps(out_dir)
    report = {"ok": True, "out_dir": str(out_dir), "env": None, "steps": {}, "measurements": []}
    for step in STEPS:
        record = records.get(step.name)
        entry = {"status": "ok", **(record or {"exit_code": None, "seconds": None, "timeout_s": None,
                                               "command": None}), "result_file": step.result_file}
        rows, error = [], None
        try:
            result = step.read(out_dir / step.result_file)
            if step.measurements is None:
                report["env"] = result
            else:
                rows = step.measurements(result)
        except MissingResult as err:
            error = str(err)
        except (KeyError, TypeError) as err:
            error = f"{step.result_file} lacks {err}"
        if record is None or record["exit_code"] != 0 or error:
            # A failed test run still has a summary ('1 failed, 40 passed'): it says what broke.
            detail = rows[0][1] if step.name == "tests" and rows else error
            entry["status"] = _failure(record, detail)
            report["ok"] = False
            rows = [(step.title, entry["status"], "")]
        command = entry["command"]
        report["measurements"] += [{"measurement": m, "value": v, "unit": u, "command": command, "step": step.name}
                                   for m, v, u in rows]
        report["steps"][step.name] = entry
    return report


def _format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def render_markdown(report: dict) -> str:
    """One table (measurement, value, unit, command), with the environment and step times above it."""
    env = report["env"] or {}
    gpu = (f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}"
           if env else "unknown (the env step failed)")
    failed = [name for name, entry in report["steps"].items() if entry["status"] != "ok"]
    verdict = "every step passed" if not failed else f"**FAILED**: {', '.join(failed)}"
    times = ", ".join(f"{name} {entry['seconds']} s" + ("" if entry["status"] == "ok" else " (failed)")
                      for name, entry in report["steps"].items() if entry["seconds"] is not None)
    lines = ["# GPU check (bench/gpu_check.sh)", "", f"GPU: {gpu}.", f"Result: {verdict}.",
             f"Step wall times: {times or 'none'}. OUT_DIR: `{report['out_dir']}`.", "",
             "| measurement | value | unit | command |", "|---|---:|---|---|"]
    previous = None
    for row in report["measurements"]:
        command = "same" if row["command"] and row["command"] == previous else (
            f"`{row['command']}`" if row["command"] else "")
        previous = row["command"]
        lines.append(f"| {row['measurement']} | {_format_value(row['value'])} | {row['unit']} | {command} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path) -> dict:
    """Build the report from OUT_DIR and write gpu_check.json and gpu_check.md there; returns it."""
    out_dir = Path(out_dir)
    report = build_report(out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / REPORT_MD).write_text(render_markdown(report))
    return report


def collect_env() -> dict:
    """torch, CUDA and GPU versions of this process (needs CUDA)."""
    import torch

    gpu = torch.cuda.get_device_properties(0)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpu": gpu.name, "gpu_memory_gib": round(gpu.total_memory / 2 ** 30, 1),
            "gpu_count": torch.cuda.device_count(), "bf16_supported": torch.cuda.is_bf16_supported(),
            "python": sys.version.split()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?", help="the folder gpu_check.sh wrote into")
    parser.add_argument("--write-env", type=Path, metavar="FILE",
                        help="instead: write the torch / CUDA / GPU versions to FILE (JSON) and print them")
    args = parser.parse_args(argv)
    if args.write_env:
        env = collect_env()
        args.write_env.write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env, indent=2))
        return 0
    if args.out_dir is None:
        parser.error("pass OUT_DIR, the folder bench/gpu_check.sh wrote into (or --write-env FILE).")
    if not args.out_dir.is_dir():
        parser.error(f"{args.out_dir} is not a folder: pass the OUT_DIR that bench/gpu_check.sh wrote into.")
    report = write_report(args.out_dir)
    print(render_markdown(report))
    for name, entry in report["steps"].items():
        if entry["status"] != "ok":
            print(f"error: step {name}: {entry['status']}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
