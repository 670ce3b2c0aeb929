"""bench/gpu_check.sh on the CPU: a clear failure without CUDA, the step bookkeeping (with a fake interpreter that
pretends a GPU is there), and the report merger (bench/gpu_check_report.py) on real and canned bench outputs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_bench(name: str):
    """Import bench/<name>.py as a module (bench scripts set sys.path[0] on import: restored afterwards)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


report = load_bench("gpu_check_report")


def run_script(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- the script without a GPU

@pytest.mark.parametrize("out_exists", [True, False], ids=["empty_out_dir", "no_out_dir"])
def test_without_cuda_the_script_exits_2_with_an_error_and_writes_nothing(tmp_path, out_exists):
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    # An empty CUDA_VISIBLE_DEVICES hides any GPU, so this holds on a GPU machine too.
    result = run_script(str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "error: bench/gpu_check.sh needs a CUDA GPU visible to torch" in result.stderr
    assert "torch.cuda.is_available() is False" in result.stderr and "CUDA build" in result.stderr
    assert result.stdout == ""
    assert (sorted(out.iterdir()) == []) if out_exists else not out.exists()


@pytest.mark.parametrize("args", [[], ["a", "b"], [""]], ids=["none", "two", "empty"])
def test_without_one_out_dir_the_script_prints_usage_and_exits_2(args):
    result = run_script(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: bench/gpu_check.sh OUT_DIR")


# ---------------------------------------------------------------- canned bench outputs (the benches' formats)

TIGER = {"device": "cuda", "threads": 16, "load_average": [0.1, 0.1, 0.1], "parameters_m": 4.95,
         "train_examples_per_s": 41234.5, "train_batch": 256, "targets_per_window": 1, "beam_users_per_s": 5120.25,
         "beam_users_per_s_without_cache": 2048.0, "cached_equals_uncached_items": True, "beam": 20, "top_k": 10,
         "eval_batch": 1024, "items": 62423}
RQVAE = {"bench": "train", "device": "cuda", "threads": 1, "items": 62423, "features": 540, "batch_size": 1024,
         "steps": 300, "items_per_s": 812345, "kmeans_init_seconds": 1.2, "seconds_per_25000_steps_h": 0.01}
ENV = {"torch": "2.5.1", "cuda": "12.4", "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "bf16_supported": True}
COMMANDS = {"env": "bash -c nvidia-smi ...", "tests": "python -m pytest -q tests/test_cuda.py",
            "tiger": "python bench/bench_decoder.py --device cuda --items 62423",
            "sasrec": "python bench/bench_sasrec.py --device cuda", "rqvae": "python bench/bench_rqvae.py train",
            "posters": "python bench/bench_poster_features.py --synthetic 512"}


@pytest.fixture(scope="module")
def bench_outputs(tmp_path_factory):
    """Real output files of bench_sasrec.py, bench_decoder.py and bench_poster_features.py at tiny sizes on the
    CPU (so the report reads what the benches really write), beside canned env, tests and RQ-VAE outputs."""
    folder = tmp_path_factory.mktemp("bench_outputs")
    threads = torch.get_num_threads()  # the benches set it for the whole process
    load_bench("bench_sasrec").main(["--device", "cpu", "--items", "50", "--batch", "4", "--max-len", "8",
                                     "--steps", "1", "--warmup", "1", "--threads", "1",
                                     "--out", str(folder / "sasrec.json")])
    decoder = load_bench("bench_decoder")
    argv = sys.argv
    sys.argv = ["bench_decoder.py", "--device", "cpu", "--items", "60", "--batch", "4", "--steps", "1",
                "--eval-batch", "2", "--eval-repeats", "1", "--threads", "1", "--out", str(folder / "tiger.json")]
    try:
        decoder.main()
    finally:
        sys.argv = argv
    load_bench("bench_poster_features").main(
        ["--synthetic", "3", "--backbones", "efficientnet_lite0", "--weights", "none", "--workers", "0",
         "--repeats", "1", "--batch-size", "3", "--device", "cpu", "--out", str(folder / "posters.md"),
         "--json", str(folder / "posters.json")])
    torch.set_num_threads(threads)
    (folder / "env.json").write_text(json.dumps(ENV))
    (folder / "tests.txt").write_text("........s.....\n14 passed, 1 skipped in 12.34s\n")
    # bench_rqvae.py prints its JSON line to stdout, which gpu_check.sh saves as rqvae.json.
    (folder / "rqvae.json").write_text("some stray line\n" + json.dumps(RQVAE) + "\n")
    return folder


def write_out_dir(out: Path, sources: Path, exit_codes: dict, skip: tuple = ()) -> Path:
    """An OUT_DIR as gpu_check.sh leaves it: the steps' files and steps.tsv (a step in `skip` never ran)."""
    out.mkdir()
    lines = []
    for step in report.STEPS:
        if step.name in skip:
            continue
        code = exit_codes.get(step.name, 0)
        source = sources / step.result_file
        if source.is_file():
            (out / step.result_file).write_bytes(source.read_bytes())
        lines.append(f"{step.name}\t{code}\t7\t90\t{COMMANDS[step.name]}\n")
    (out / report.STEPS_FILE).write_text("".join(lines))
    return out


def test_bench_sasrec_smoke_on_cpu_reports_positive_sequences_per_s(bench_outputs):
    result = json.loads((bench_outputs / "sasrec.json").read_text())
    assert result["device"] == "cpu" and result["precision"] == "float32"
    assert result["train_sequences_per_s"] > 0 and np.isfinite(result["train_sequences_per_s"])
    assert result["train_positions_per_s"] == pytest.approx(result["train_sequences_per_s"] * 8)
    assert (result["items"], result["batch"], result["max_len"], result["steps"]) == (50, 4, 8, 1)
    # Everything else is the ML-25M preset of configs/sasrec_ml25m.gin.
    assert (result["hidden_dim"], result["n_layers"], result["n_heads"], result["ffn_dim"], result["dropout"]) == \
        (128, 2, 2, 512, 0.2)
    assert result["config"] == "configs/sasrec_ml25m.gin"


def test_bench_sasrec_defaults_are_the_ml25m_preset():
    """No run: the parser's defaults and what the bench reads from configs/sasrec_ml25m.gin."""
    bench = load_bench("bench_sasrec")
    args = bench.build_parser().parse_args([])
    assert args.items == 62423 and Path(args.config) == REPO / "configs" / "sasrec_ml25m.gin"
    assert bench.preset(args.config) == {
        "model": {"hidden_dim": 128, "n_layers": 2, "n_heads": 2, "max_len": 200, "dropout": 0.2, "ffn_dim": 512},
        "batch": 128, "learning_rate": 0.001, "weight_decay": 0.01}
    assert bench.preset(args.config, batch=4, max_len=8)["model"]["max_len"] == 8


def test_synthetic_posters_are_seeded_structured_jpegs(tmp_path):
    from experiments.poster_features import load_poster_rgb
    from PIL import Image

    bench = load_bench("bench_poster_features")
    paths = bench.write_synthetic_posters(tmp_path / "a", 3, seed=0)
    again = bench.write_synthetic_posters(tmp_path / "b", 3, seed=0)
    assert [p.name for p in paths] == ["1.jpg", "2.jpg", "3.jpg"]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert paths[0].read_bytes() != paths[1].read_bytes()
    with Image.open(paths[0]) as img:
        assert img.format == "JPEG" and img.size == (342, 513)
    pixels = load_poster_rgb(paths[0], 224)
    assert pixels.shape == (224, 224, 3) and pixels.std() > 10  # not a flat image
    assert bench.sample_posters(tmp_path / "a", 2) == [paths[0], paths[2]]


def test_poster_bench_on_synthetic_posters_writes_json_and_markdown(bench_outputs):
    result = json.loads((bench_outputs / "posters.json").read_text())
    assert result["posters"] == "synthetic (3)" and result["precision"] == "float32"
    [row] = result["rows"]
    assert row["backbone"] == "efficientnet_lite0" and row["weights"] == "none" and row["n"] == 3
    assert row["forward"] > 0 and row["pipeline"] > 0 and row["decode"] > 0
    markdown = (bench_outputs / "posters.md").read_text()
    assert "3 synthetic posters (342 x 513)" in markdown and "| efficientnet_lite0 | none | 3 |" in markdown


# ---------------------------------------------------------------- the report

def test_report_merges_every_step_into_one_table(tmp_path, bench_outputs):
    out = write_out_dir(tmp_path / "out", bench_outputs, exit_codes={})
    assert report.main([str(out)]) == 0
    merged = json.loads((out / "gpu_check.json").read_text())
    assert merged["ok"] is True and merged["env"]["gpu"] == "NVIDIA H200"
    assert all(entry["status"] == "ok" for entry in merged["steps"].values())
    assert list(merged["steps"]) == ["env", "tests", "tiger", "sasrec", "rqvae", "posters"]
    by_unit = {}
    for row in merged["measurements"]:
        by_unit.setdefault(row["unit"], []).append(row)
    tiger = json.loads((bench_outputs / "tiger.json").read_text())
    sasrec = json.loads((bench_outputs / "sasrec.json").read_text())
    posters = json.loads((bench_outputs / "posters.json").read_text())
    assert [r["value"] for r in by_unit["examples/s"]] == [tiger["train_examples_per_s"]]
    assert [r["value"] for r in by_unit["users/s"]] == [tiger["beam_users_per_s"],
                                                        tiger["beam_users_per_s_without_cache"]]
    assert [r["value"] for r in by_unit["sequences/s"]] == [sasrec["train_sequences_per_s"]]
    assert [r["value"] for r in by_unit["items/s"]] == [812345]
    assert [r["value"] for r in by_unit["images/s"]] == [posters["rows"][0]["forward"], posters["rows"][0]["pipeline"]]
    assert [r["value"] for r in by_unit["pytest"]] == ["14 passed, 1 skipped in 12.34s"]
    assert {r["command"] for r in by_unit["items/s"]} == {COMMANDS["rqvae"]}

    markdown = (out / "gpu_check.md").read_text()
    assert "GPU: NVIDIA H200, torch 2.5.1, CUDA 12.4." in markdown and "Result: every step passed." in markdown
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0] == "| measurement | value | unit | command |"
    assert len(table) == 2 + len(merged["measurements"]) == 2 + 9  # tests 1, TIGER 4, SASRec 1, RQ-VAE 1, posters 2
    assert f"| RQ-VAE training (62,423 items x 540 features, batch 1024, float32) | 812,345 | items/s | " \
           f"`{COMMANDS['rqvae']}` |" in table
    assert "| CUDA tests (tests/test_cuda.py, test_beam_search.py, test_tiger.py) | 14 passed, 1 skipped in " \
           "12.34s | pytest |" in markdown


def test_report_marks_failed_timed_out_empty_and_missing_steps(tmp_path, bench_outputs, capsys):
    out = write_out_dir(tmp_path / "out", bench_outputs, exit_codes={"tests": 1, "tiger": 124, "sasrec": 3},
                        skip=("posters",))
    (out / "tests.txt").write_text("F.....\n1 failed, 5 passed in 3.21s\n")
    (out / "rqvae.json").write_text("Traceback: no JSON here\n")  # exit 0, but no result
    assert report.main([str(out)]) == 1
    assert "error: step tiger: FAILED: timed out after 90 s (exit 124)" in capsys.readouterr().err
    merged = json.loads((out / "gpu_check.json").read_text())
    status = {name: entry["status"] for name, entry in merged["steps"].items()}
    assert merged["ok"] is False
    assert status == {
        "env": "ok",
        "tests": "FAILED: exit 1; 1 failed, 5 passed in 3.21s",
        "tiger": "FAILED: timed out after 90 s (exit 124)",
        "sasrec": "FAILED: exit 3",
        "rqvae": "FAILED: exit 0 but no results; rqvae.json holds no JSON object",
        "posters": "FAILED: not run (no line in steps.tsv: the script stopped before this step)"}
    # A failed step is one FAILED row, never its (possibly stale) figures.
    assert [(row["step"], row["value"]) for row in merged["measurements"]] == \
        [(name, status[name]) for name in ("tests", "tiger", "sasrec", "rqvae", "posters")]
    markdown = (out / "gpu_check.md").read_text()
    assert "Result: **FAILED**: tests, tiger, sasrec, rqvae, posters." in markdown
    assert "| TIGER training and beam search | FAILED: timed out after 90 s (exit 124) |  | " in markdown


def test_report_of_a_step_whose_result_lacks_a_figure_is_a_failure(tmp_path, bench_outputs):
    out = write_out_dir(tmp_path / "out", bench_outputs, exit_codes={})
    (out / "sasrec.json").write_text(json.dumps({"device": "cuda"}))
    merged = report.write_report(out)
    assert merged["ok"] is False
    assert merged["steps"]["sasrec"]["status"].startswith("FAILED: exit 0 but no results; sasrec.json lacks")


# ---------------------------------------------------------------- the script's bookkeeping, with a fake GPU

FAKE_PYTHON = '''#!{python}
"""Stands in for python in gpu_check.sh: says a GPU is there, and each step leaves a canned result."""
import json, pathlib, runpy, sys
args = sys.argv[1:]
command = " ".join(args)
canned = pathlib.Path({canned!r})
broken = {broken!r}
def value_of(flag):
    return args[args.index(flag) + 1]
if args[0] == "-c":                                       # the CUDA probe
    print("torch 9.9 (fake), CUDA build 99.9")
elif "--write-env" in args:
    pathlib.Path(args[-1]).write_text(json.dumps({{"gpu": "Fake GPU", "torch": "9.9", "cuda": "99.9"}}))
elif args[0].endswith("gpu_check_report.py"):
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
elif args[:2] == ["-m", "pytest"]:
    print("14 passed in 1.00s")
elif "bench_decoder.py" in command:
    pathlib.Path(value_of("--out")).write_text((canned / "tiger.json").read_text())
elif "bench_sasrec.py" in command:
    if broken:
        print("CUDA out of memory", file=sys.stderr)
        sys.exit(3)
    pathlib.Path(value_of("--out")).write_text((canned / "sasrec.json").read_text())
elif "bench_rqvae.py" in command:
    print((canned / "rqvae.json").read_text())
elif "bench_poster_features.py" in command:
    if not broken:
        pathlib.Path(value_of("--json")).write_text((canned / "posters.json").read_text())
else:
    sys.exit(f"fake python: unexpected command {{command}}")
'''


@pytest.mark.parametrize("broken", [False, True], ids=["all_pass", "two_steps_fail"])
def test_script_runs_every_step_records_it_and_fails_loudly(tmp_path, bench_outputs, broken):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_python = fake_bin / "fake-python"
    fake_python.write_text(FAKE_PYTHON.format(python=sys.executable, canned=str(bench_outputs), broken=broken))
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI fake'\n")
    for path in fake_bin.iterdir():
        path.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "posters.json").write_text((bench_outputs / "posters.json").read_text())  # stale, from an earlier check
    result = run_script(str(out), env={"PYTHON": str(fake_python), "PATH": f"{fake_bin}:{os.environ['PATH']}"})

    merged = json.loads((out / "gpu_check.json").read_text())
    steps = merged["steps"]
    assert list(steps) == ["env", "tests", "tiger", "sasrec", "rqvae", "posters"]
    assert all(entry["exit_code"] is not None for entry in steps.values())  # every step ran
    assert "NVIDIA-SMI fake" in (out / "env.txt").read_text()
    # The ML-25M sizes, as the issue asks.
    assert "--items 62423 --batch 256" in steps["tiger"]["command"] and "--eval-batch 1024" in steps["tiger"]["command"]
    assert "--items 62423" in steps["rqvae"]["command"]
    assert "--out OUT_DIR/tiger.json" in steps["tiger"]["command"]  # the folder, spelled OUT_DIR in the report
    assert "--synthetic 512" in steps["posters"]["command"] and "--weights none" in steps["posters"]["command"]
    assert "tests/test_cuda.py tests/test_beam_search.py tests/test_tiger.py" in steps["tests"]["command"]
    # The 8-minute budget: every limit plus its 5 s kill grace, the report's 30 s and the probe's ~15 s.
    assert sum(entry["timeout_s"] + 5 for entry in steps.values()) + 30 + 15 <= 480
    if not broken:
        assert result.returncode == 0, result.stderr
        assert merged["ok"] is True
        assert "every step passed" in result.stderr
    else:
        assert result.returncode == 1
        assert "gpu_check: step sasrec FAILED (exit 3)" in result.stderr
        assert "FAILED steps: sasrec" in result.stderr
        assert "CUDA out of memory" in (out / "sasrec.log").read_text()
        assert steps["sasrec"]["status"] == "FAILED: exit 3; sasrec.json was not written"
        assert "error: step posters: FAILED: exit 0 but no results" in result.stderr
        # The stale posters.json of an earlier check was removed, so a step that wrote nothing fails.
        assert steps["posters"]["status"] == "FAILED: exit 0 but no results; posters.json was not written"
        assert "Result: **FAILED**: sasrec, posters." in (out / "gpu_check.md").read_text()
