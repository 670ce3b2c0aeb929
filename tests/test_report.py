"""The run report: merging baselines and decoder results, the n_test_users check, results.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np

from experiments.artifacts import ArtifactError, file_digest, save_json, save_npy
from experiments.baselines import METRIC_NAMES, semantic_ids_digest, write_run_report

REPO = Path(__file__).resolve().parents[1]
SEMANTIC_IDS = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0]], dtype=np.int64)
IDS = {"semantic_ids": "rqvae", "semantic_ids_sha1": semantic_ids_digest(SEMANTIC_IDS)}  # as train_decoder records them
INTERACTIONS = dict(user_ids=np.arange(3), offsets=np.array([0, 3, 6, 9]), item_index=np.zeros(9, np.int32),
                    timestamps=np.arange(9), ratings=np.ones(9, np.float32))


def trained_on(run: Path) -> dict:
    """The fingerprint field every result records: here only the digest of the run's interactions."""
    return {"fingerprint": {"inputs": {"interactions.npz": file_digest(run / "interactions.npz")}}}


def metrics(base: float) -> dict:
    """Four distinct, recognisable metric values, and their untied subset (3 users, base + 0.05)."""
    flat = {name: round(base + i / 100, 4) for i, name in enumerate(METRIC_NAMES)}
    return flat | {"untied": {name: round(value + 0.05, 4) for name, value in flat.items()} | {"n_users": 3}}


def write_results(run: Path, n_users: int = 7, random_ids_users: int | None = None) -> Path:
    """A run folder holding baselines/metrics.json, decoder/ and decoder_random_ids/ results."""
    run.mkdir(parents=True, exist_ok=True)
    np.savez(run / "interactions.npz", **INTERACTIONS)
    global IDS
    IDS = IDS | trained_on(run)
    save_json(run / "baselines" / "metrics.json", {"n_test_users": n_users, "models": {
        "popularity": {"valid": metrics(0.1), "test": metrics(0.2), **trained_on(run)},
        "sasrec": {"valid": metrics(0.3), "test": metrics(0.4), "best_epoch": 3, **trained_on(run)}}})
    save_json(run / "decoder" / "metrics.json",
              {"model": "tiger", "n_test_users": n_users, "valid": metrics(0.5), "test": metrics(0.6), "step": 9,
               "semantic_ids": str(run / "rqvae"), "semantic_ids_sha1": semantic_ids_digest(SEMANTIC_IDS),
               **trained_on(run)})
    save_npy(run / "rqvae" / "semantic_ids.npy", SEMANTIC_IDS)
    save_json(run / "decoder_random_ids" / "metrics.json",
              {"model": "tiger_random_ids", "n_test_users": random_ids_users or n_users,
               "valid": metrics(0.7), "test": metrics(0.8), "semantic_ids": "random", **trained_on(run)})
    return run


def test_report_merges_test_metrics_per_model(tmp_path):
    run = write_results(tmp_path / "run")
    merged = write_run_report(run)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == merged
    assert on_disk["n_test_users"] == 7
    assert list(on_disk["models"]) == ["tiger", "tiger_random_ids", "popularity", "sasrec"]
    assert on_disk["models"]["tiger"] == metrics(0.6)  # test metrics at the top level
    assert on_disk["models"]["sasrec"] == metrics(0.4)
    assert on_disk["valid_models"]["popularity"] == metrics(0.1)
    table = (run / "results.md").read_text()
    assert "leave-one-out" in table and "full ranking" in table and "excluded" in table
    assert "Test users: 7" in table
    assert "| tiger | 0.6000 | 0.6100 | 0.6200 | 0.6300 |" in table
    assert "untied targets (3 users" in table and "| tiger | 0.6500 | 0.6600 | 0.6700 | 0.6800 |" in table
    assert "| model | recall@5 | recall@10 | ndcg@5 | ndcg@10 |" in table


def test_report_names_the_file_whose_user_count_disagrees(tmp_path):
    run = write_results(tmp_path / "run", n_users=7, random_ids_users=6)
    with pytest.raises(ArtifactError, match=r"decoder_random_ids/metrics.json reports n_test_users = 6.*reports 7"):
        write_run_report(run)
    assert not (run / "metrics.json").exists()


def test_report_decoder_folders(tmp_path):
    run = write_results(tmp_path / "run")
    (run / "decoder_random_ids" / "metrics.json").unlink()
    merged = write_run_report(run)  # defaults: a missing decoder is reported as not run
    assert "tiger_random_ids" not in merged["models"]
    assert "not found (not run yet)" in (run / "results.md").read_text()
    with pytest.raises(ArtifactError, match="decoder_random_ids/metrics.json is missing"):
        write_run_report(run, ["decoder", "decoder_random_ids"])
    only_tiger = write_run_report(run, ["decoder"], overwrite=True)
    assert set(only_tiger["models"]) == {"tiger", "popularity", "sasrec"}
    # A report made with other folders is not up to date, even when it is newer than every input.
    save_json(run / "decoder_no_posters" / "metrics.json",
              {"model": "tiger_no_posters", "n_test_users": 7, "valid": metrics(0.3), "test": metrics(0.35), **IDS})
    old = (run / "metrics.json").stat().st_mtime - 10
    os.utime(run / "decoder_no_posters" / "metrics.json", (old, old))
    with_ablation = write_run_report(run, ["decoder", "decoder_no_posters"])
    assert set(with_ablation["models"]) == {"tiger", "tiger_no_posters", "popularity", "sasrec"}
    assert "| tiger_no_posters |" in (run / "results.md").read_text()


def test_report_rejects_malformed_and_duplicate_results(tmp_path):
    run = write_results(tmp_path / "run")
    save_json(run / "decoder" / "metrics.json", {"model": "tiger", "n_test_users": 7, "valid": metrics(0.5),
                                                 "test": {"recall@10": 0.1}, **IDS})
    with pytest.raises(ArtifactError, match=r"decoder/metrics.json: field 'test' lacks \['recall@5'"):
        write_run_report(run)
    save_json(run / "decoder" / "metrics.json", {"model": "sasrec", "n_test_users": 7, "valid": metrics(0.5),
                                                 "test": metrics(0.6), **IDS})
    with pytest.raises(ArtifactError, match="'sasrec' appears in both"):
        write_run_report(run)
    with pytest.raises(ArtifactError, match="nothing to report"):
        write_run_report(tmp_path / "empty")


def test_report_skips_when_up_to_date_and_redoes_after_new_results(tmp_path):
    run = write_results(tmp_path / "run")
    write_run_report(run)
    first_mtime = (run / "metrics.json").stat().st_mtime_ns
    write_run_report(run)
    assert (run / "metrics.json").stat().st_mtime_ns == first_mtime
    save_json(run / "decoder" / "metrics.json",
              {"model": "tiger", "n_test_users": 7, "valid": metrics(0.5), "test": metrics(0.9), **IDS})
    future = (run / "metrics.json").stat().st_mtime + 10
    os.utime(run / "decoder" / "metrics.json", (future, future))
    assert write_run_report(run)["models"]["tiger"] == metrics(0.9)


def test_report_script_exits_with_the_error(tmp_path):
    run = write_results(tmp_path / "run", n_users=7, random_ids_users=5)
    done = subprocess.run([sys.executable, "experiments/08_report.py", "--run", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "decoder_random_ids/metrics.json reports n_test_users = 5" in done.stderr


def test_report_refuses_a_decoder_trained_on_other_semantic_ids(tmp_path):
    """The RQ-VAE was re-run after the decoder trained: the report stops instead of showing stale numbers."""
    run = write_results(tmp_path / "run")
    write_run_report(run)
    save_npy(run / "rqvae" / "semantic_ids.npy", SEMANTIC_IDS[[1, 0, 2]])
    with pytest.raises(ArtifactError, match="other semantic IDs than the current .*semantic_ids.npy"):
        write_run_report(run)


def test_report_refuses_results_without_untied_metrics(tmp_path):
    run = write_results(tmp_path / "run")
    baselines = json.loads((run / "baselines" / "metrics.json").read_text())
    del baselines["models"]["sasrec"]["test"]["untied"]
    save_json(run / "baselines" / "metrics.json", baselines)
    with pytest.raises(ArtifactError, match=r"models.sasrec.test' lacks \['untied'\].*older version"):
        write_run_report(run)


def test_an_npz_saved_twice_has_one_digest(tmp_path):
    """The zip container of .npz stores write times; the fingerprint hashes the arrays instead."""
    from experiments.artifacts import file_digest
    np.savez(tmp_path / "a.npz", x=np.arange(5), y=np.ones(3))
    os.utime(tmp_path / "a.npz", (0, 0))
    first = file_digest(tmp_path / "a.npz")
    import time
    time.sleep(2.1)   # zip timestamps have a 2-second resolution
    np.savez(tmp_path / "a.npz", x=np.arange(5), y=np.ones(3))
    assert file_digest(tmp_path / "a.npz")["sha1"] == first["sha1"]
    np.savez(tmp_path / "a.npz", x=np.arange(5), y=np.zeros(3))
    assert file_digest(tmp_path / "a.npz")["sha1"] != first["sha1"]


def test_report_refuses_results_trained_on_other_interactions(tmp_path):
    """The run was prepared again (say with another --tie-break): every old result is refused, not relabelled."""
    run = write_results(tmp_path / "run")
    write_run_report(run)
    np.savez(run / "interactions.npz", **INTERACTIONS | {"timestamps": np.arange(9)[::-1].copy()})
    with pytest.raises(ArtifactError, match="trained on other interactions than the current .*interactions.npz"):
        write_run_report(run)
