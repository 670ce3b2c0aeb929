"""train_decoder.py under torchrun with 2 CPU processes (gloo): the same result as one process with the same
global batch, files written by rank 0 only, and a killed 2-process run that resumes to the same result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_decoder import TINY_MODEL, make_run

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Dropout off: each rank draws its own dropout masks (seed + rank), so only without it can 2 processes
# equal 1 (the gradients of two half batches, averaged, are those of the whole batch).
CONFIG = TINY_MODEL + "Tiger.dropout = 0.0\ntrain_decoder.batch_size = 16\ntrain_decoder.eval_batch_size = 8\n"

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun not found beside {sys.executable}")


def train(tmp_path: Path, run: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.gin"
    config.write_text(CONFIG)
    launcher = ([str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}"] if processes > 1
                else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(launcher + ["train_decoder.py", str(config), "--gin_param", f"RUN_DIR = '{run}'",
                                      "--out", str(out), "--threads", "1", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_ddp_two_processes_match_one_with_the_same_global_batch(tmp_path):
    run = make_run(tmp_path / "run")
    one = train(tmp_path, run, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train(tmp_path, run, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    single, ddp = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert "rank 0 of 2" in two.stderr and "rank 0 of 1" in one.stderr
    assert ddp["best_step"] == single["best_step"]
    for split in ("valid", "test"):
        for name in ("recall@10", "ndcg@10", "nll"):
            assert ddp[split][name] == pytest.approx(single[split][name], rel=1e-4, abs=1e-5), (split, name)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["history"]["train_loss"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["history"]["train_loss"]
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [loss for _, loss in b] == pytest.approx([loss for _, loss in a], rel=1e-4)
    # Rank 0 alone writes: the same files as one process, and one copy of each.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_ddp_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    run = make_run(tmp_path / "run")
    straight = train(tmp_path, run, tmp_path / "straight", 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = train(tmp_path, run, tmp_path / "resumed", 2, "--stop-at-step", "3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = train(tmp_path, run, tmp_path / "resumed", 2)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")
