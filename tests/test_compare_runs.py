"""experiments/compare_runs.py on tiny run folders made in tmp_path: identical runs, perturbed features,
differing semantic IDs, metric differences, missing steps."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import compare_runs as cr
from experiments.artifacts import save_json, save_npy, save_npz

N_ITEMS = 12


def metrics(ndcg10: float) -> dict:
    """A metrics.json body as train_decoder.py writes it (valid and test blocks)."""
    block = {"recall@5": 0.1, "recall@10": 0.2, "ndcg@5": 0.05, "ndcg@10": ndcg10, "nll": 8.0}
    return {"model": "tiger", "valid": dict(block), "test": dict(block)}


def make_run(folder: Path, seed: int = 0) -> Path:
    """A run folder with every step's compared files: fake arrays of 12 items, posters missing for 2."""
    rng = np.random.default_rng(seed)
    movie_ids = np.arange(1, N_ITEMS + 1, dtype=np.int64) * 10
    save_npy(folder / "item_ids.npy", movie_ids)
    save_npz(folder / "interactions.npz", user_ids=np.arange(3), offsets=np.array([0, 4, 8, 12]),
             item_index=np.arange(12, dtype=np.int32), timestamps=np.arange(12), ratings=np.ones(12, np.float32))
    save_json(folder / "stats.json", {"users": 3, "items": N_ITEMS, "seconds": 0.1,
                                      "source": {"data_dir": str(folder), "files": {}}})
    posters = rng.normal(size=(N_ITEMS, 8)).astype(np.float32)
    has_poster = np.ones(N_ITEMS, dtype=bool)
    has_poster[[3, 7]] = False
    posters[~has_poster] = np.nan
    save_npy(folder / "poster_features" / "features.npy", posters)
    save_npy(folder / "poster_features" / "has_poster.npy", has_poster)
    save_npy(folder / "poster_features" / "movie_ids.npy", movie_ids)
    save_npy(folder / "item_features" / "features.npy", rng.normal(size=(N_ITEMS, 5)).astype(np.float32))
    save_npy(folder / "item_features" / "movie_ids.npy", movie_ids)
    codes = np.stack([np.arange(N_ITEMS) % 4, np.arange(N_ITEMS) % 3, np.zeros(N_ITEMS, int)], 1)
    save_npy(folder / "rqvae" / "semantic_ids.npy", np.concatenate([codes, np.zeros((N_ITEMS, 1), int)], 1))
    save_npy(folder / "rqvae" / "movie_ids.npy", movie_ids)
    save_json(folder / "decoder" / "metrics.json", metrics(0.03))
    save_json(folder / "decoder_random_ids" / "metrics.json", metrics(0.01))
    save_json(folder / "baselines" / "metrics.json", {"n_test_users": 3, "models": {
        "popularity": metrics(0.02), "sasrec": metrics(0.05)}})
    return folder


@pytest.fixture
def twin_runs(tmp_path):
    """Two identical run folders A and B (B is a copy of A, with another data_dir and timing in stats.json)."""
    run_a = make_run(tmp_path / "a")
    run_b = tmp_path / "b"
    shutil.copytree(run_a, run_b)
    stats = json.loads((run_b / "stats.json").read_text())
    save_json(run_b / "stats.json", stats | {"seconds": 9.9, "source": {"data_dir": "/elsewhere", "files": {}}})
    return run_a, run_b


def by_step(reports) -> dict:
    return {r.step: r for r in reports}


def test_identical_runs_report_every_step_identical(twin_runs, capsys):
    reports = cr.compare_runs(*twin_runs)
    assert [r.step for r in reports] == ["prepare", "poster_features", "item_features", "rqvae", "decoder",
                                         "decoder_random_ids", "baselines"]
    assert all(r.status == "identical" for r in reports), cr.format_report(reports, *twin_runs)
    assert cr.main([str(p) for p in twin_runs]) == 0
    assert "7 of 7 steps present in both runs are identical." in capsys.readouterr().out


def test_perturbed_poster_features_report_the_difference_and_later_steps_still_run(twin_runs):
    run_a, run_b = twin_runs
    features = np.load(run_b / "poster_features" / "features.npy")
    features[5, 2] = np.nextafter(features[5, 2], np.float32(np.inf))  # one ulp on one element
    features[9, 0] += 1e-3
    save_npy(run_b / "poster_features" / "features.npy", features)
    steps = by_step(cr.compare_runs(run_a, run_b))
    poster = steps["poster_features"]
    assert poster.status == "different"
    numbers = poster.numbers["features"]
    assert not numbers["identical"] and numbers["rows_differ"] == 2 and numbers["nan_mismatch"] == 0
    assert numbers["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert numbers["frac_elements"] == pytest.approx(2 / features.size)
    assert steps["item_features"].status == "identical"  # the comparison did not stop at the first difference
    assert steps["baselines"].status == "identical"


def test_nan_rows_equal_in_both_runs_count_as_identical_and_a_new_nan_does_not():
    a = np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32)
    assert cr.array_difference(a, a.copy())["identical"]
    b = a.copy()
    b[1, 1] = np.nan
    d = cr.array_difference(a, b)
    assert not d["identical"] and d["nan_mismatch"] == 1 and d["rows_differ"] == 1


def test_differing_semantic_ids_report_the_fraction_of_items_and_the_unique_fraction(twin_runs):
    run_a, run_b = twin_runs
    ids = np.load(run_b / "rqvae" / "semantic_ids.npy")
    ids[[0, 1, 2], 0] = (ids[[0, 1, 2], 0] + 1) % 4  # 3 of 12 items change their first code
    save_npy(run_b / "rqvae" / "semantic_ids.npy", ids)
    report = by_step(cr.compare_runs(run_a, run_b))["rqvae"]
    assert report.status == "different"
    assert report.numbers["frac_items_codes"] == pytest.approx(3 / 12)
    assert report.numbers["frac_level"] == pytest.approx([3 / 12, 0.0, 0.0])
    assert report.numbers["unique_a"] == pytest.approx(1.0)  # (i % 4, i % 3) is unique for i < 12
    assert report.numbers["unique_b"] < 1.0
    assert "25.00% of items have another code tuple" in report.lines[0]


def test_renamed_codes_differ_everywhere_but_keep_the_grouping():
    ids = np.stack([np.arange(12) % 4, np.arange(12) % 3, np.zeros(12, int), np.zeros(12, int)], 1)
    renamed = ids.copy()
    renamed[:, 0] = (ids[:, 0] + 1) % 4  # the same partition under other code numbers
    d = cr.semantic_id_difference(ids, renamed)
    assert d["frac_items_codes"] == 1.0 and d["ari_level1"] == pytest.approx(1.0) and d["ari_codes"] == pytest.approx(1.0)


def test_metric_differences_are_listed_per_split_and_model(twin_runs):
    run_a, run_b = twin_runs
    save_json(run_b / "decoder" / "metrics.json", metrics(0.0332))
    steps = by_step(cr.compare_runs(run_a, run_b))
    decoder = steps["decoder"]
    assert decoder.status == "different"
    assert decoder.numbers["metrics"]["test/ndcg@10"] == pytest.approx((0.03, 0.0332, 0.0032))
    assert any("test/ndcg@10" in line and "+0.0032" in line for line in decoder.lines)
    assert steps["decoder_random_ids"].status == "identical"


def test_missing_steps_are_reported_with_the_file_and_the_producer(twin_runs, capsys):
    run_a, run_b = twin_runs
    shutil.rmtree(run_b / "rqvae")
    (run_a / "baselines" / "metrics.json").unlink()
    steps = by_step(cr.compare_runs(run_a, run_b))
    assert steps["rqvae"].status == "missing"
    assert any("rqvae/semantic_ids.npy is missing in B" in line for line in steps["rqvae"].lines)
    assert any("train_rqvae.py" in line for line in steps["rqvae"].lines)
    assert steps["baselines"].status == "missing"
    assert steps["decoder"].status == "identical"  # steps after a missing one are still compared
    assert cr.main([str(run_a), str(run_b)]) == 0  # missing steps do not count as differences
    assert "5 of 5 steps present in both runs are identical." in capsys.readouterr().out


def test_rows_of_other_items_are_not_compared(twin_runs):
    run_a, run_b = twin_runs
    save_npy(run_b / "item_features" / "movie_ids.npy", np.arange(N_ITEMS, dtype=np.int64))
    report = by_step(cr.compare_runs(run_a, run_b))["item_features"]
    assert report.status == "incomparable" and "other items" in report.lines[0]


def test_a_run_folder_that_does_not_exist_is_a_clear_error(tmp_path, capsys):
    make_run(tmp_path / "a")
    assert cr.main([str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "run folder" in capsys.readouterr().err


def test_differences_exit_with_1_and_the_json_report_is_written(twin_runs, tmp_path):
    run_a, run_b = twin_runs
    save_json(run_b / "baselines" / "metrics.json", {"models": {"popularity": metrics(0.02),
                                                                "sasrec": metrics(0.0547)}})
    out = tmp_path / "report.json"
    assert cr.main([str(run_a), str(run_b), "--json", str(out)]) == 1
    saved = {r["step"]: r for r in json.loads(out.read_text())}
    assert saved["baselines"]["status"] == "different"
    assert saved["baselines"]["numbers"]["sasrec"]["test/ndcg@10"][2] == pytest.approx(0.0047)


def test_block_by_block_comparison_equals_the_whole_array_at_once():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(10, 4)).astype(np.float32)
    a[2] = np.nan
    b = a + rng.normal(scale=1e-6, size=a.shape).astype(np.float32) * (rng.random(a.shape) < 0.3)
    whole, blocks = cr.array_difference(a, b, rows_per_block=100), cr.array_difference(a, b, rows_per_block=3)
    assert whole == pytest.approx(blocks)
    assert not whole["identical"] and whole["nan_mismatch"] == 0 and 0 < whole["frac_elements"] < 0.5
