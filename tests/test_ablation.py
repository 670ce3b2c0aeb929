"""The ablation summary: feature sets follow the data, statistics and table are right."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from experiments.ablation import contrasts, feature_sets, markdown_table, run_ablation, summarise

REPO = Path(__file__).resolve().parents[1]


def test_genome_joins_metadata_sets_only_when_present(tmp_path):
    sets = feature_sets(tmp_path)
    assert sets["text"].blocks == ("genres", "year", "tags") and "poster" not in sets["text"].blocks
    (tmp_path / "genome-scores.csv").write_text("movieId,tagId,relevance\n")
    sets = feature_sets(tmp_path, with_text=True)
    assert sets["all"].blocks == ("genres", "year", "tags", "genome", "poster", "text")
    assert sets["genres_year"].blocks == ("genres", "year")


def test_summary_mean_std_and_table():
    def metrics(r10):
        return {"n_test_users": 7, "test": {"recall@5": r10 / 2, "recall@10": r10, "ndcg@5": r10 / 4,
                                            "ndcg@10": r10 / 3}}
    sets = feature_sets("/nonexistent")
    summary = summarise({"poster": {0: metrics(0.2), 1: metrics(0.4)}, "genres_year": {0: metrics(0.1)}}, sets)
    assert summary["poster"]["mean"]["recall@10"] == pytest.approx(0.3)
    assert summary["poster"]["std"]["recall@10"] == pytest.approx(0.1414213, rel=1e-5)   # sample std, ddof=1
    assert summary["genres_year"]["std"]["recall@10"] == 0.0
    table = markdown_table(summary)
    assert "| + poster | genres, year, poster | 0.1500 ± 0.0707 | 0.3000 ± 0.1414 |" in table


def test_unknown_feature_set_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown feature set\(s\) \['posters'\]"):
        run_ablation(tmp_path, tmp_path, tmp_path, ["posters"], [0], "a.gin", "b.gin")


def test_runner_fuses_each_set_once_before_the_cells_and_runs_seed_by_seed(tmp_path, monkeypatch):
    import json
    import threading

    import experiments.ablation as ablation

    commands, lock = [], threading.Lock()

    def fake_run(cmd):  # record the command; a decoder "writes" its metrics.json
        with lock:
            commands.append(cmd)
        if cmd[1] == "train_rqvae.py":      # the RQ-VAE's health.json, which the summary reads its ID statistics from
            out = tmp_path / cmd[cmd.index("--out") + 1]
            out.mkdir(parents=True)
            seed = int(cmd[cmd.index("--gin_param") + 1].split("=")[1])
            (out / "health.json").write_text(json.dumps({"unique_fraction": 0.5 + seed / 10, "max_collision_group": 3}))
        if cmd[1] == "train_decoder.py":
            out = tmp_path / cmd[cmd.index("--out") + 1]
            out.mkdir(parents=True)
            seed = int(cmd[cmd.index("--gin_param") + 1].split("=")[1])
            test = {"recall@5": 0.1, "recall@10": 0.2 + seed / 100, "ndcg@5": 0.05, "ndcg@10": 0.07}
            (out / "metrics.json").write_text(json.dumps({"n_test_users": 9, "test": test}))

    monkeypatch.setattr(ablation, "run_script", fake_run)
    summary = run_ablation(tmp_path / "run", tmp_path, tmp_path / "pf", ["genres_year", "all"], [0, 1],
                           "r.gin", "d.gin", out=tmp_path / "abl", jobs=2)
    scripts = [c[1] for c in commands]
    assert scripts[:2] == ["experiments/05_fuse_item_features.py"] * 2      # both sets fused first, once
    assert scripts.count("experiments/05_fuse_item_features.py") == 2
    decoders = [c for c in commands if c[1] == "train_decoder.py"]
    assert len(decoders) == 4 and all(c[c.index("--threads") + 1] == "1" for c in decoders)
    assert summary["all"]["mean"]["recall@10"] == pytest.approx(0.205)
    assert summary["all"]["extra"]["unique IDs"]["mean"] == pytest.approx(0.55)
    assert (tmp_path / "abl" / "ablation.md").is_file() and (tmp_path / "abl" / "ablation.png").is_file()
    commands.clear()
    run_ablation(tmp_path / "run", tmp_path, tmp_path / "pf", ["genres_year", "all"], [0, 1], "r.gin", "d.gin",
                 out=tmp_path / "one_job", jobs=1)
    cells = [c[c.index("--out") + 1].split("/")[-3:-1] for c in commands if c[1] == "train_decoder.py"]
    assert cells == [["genres_year", "seed0"], ["all", "seed0"], ["genres_year", "seed1"], ["all", "seed1"]]
    assert not any("--threads" in c for c in commands if c[1] == "train_decoder.py")
    with pytest.raises(ValueError, match="jobs"):
        run_ablation(tmp_path / "run", tmp_path, tmp_path / "pf", ["all"], [0], "r.gin", "d.gin", jobs=0)


def test_a_failed_cell_stops_the_ablation_before_any_queued_cell(tmp_path, monkeypatch):
    import subprocess

    import experiments.ablation as ablation

    decoders = []

    def fake_run(cmd):
        if cmd[1] == "train_decoder.py":
            decoders.append(cmd)
            raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(ablation, "run_script", fake_run)
    with pytest.raises(subprocess.CalledProcessError):
        run_ablation(tmp_path / "run", tmp_path, tmp_path / "pf", ["genres_year", "all"], [0, 1, 2], "r.gin", "d.gin",
                     out=tmp_path / "abl", jobs=1)
    assert len(decoders) == 1  # the other five cells never started
    assert not (tmp_path / "abl" / "ablation.md").exists()


def _decoder_metrics(ndcg10: float, valid_ndcg10: float, nll: float = 7.0) -> dict:
    test = {"recall@5": ndcg10, "recall@10": 2 * ndcg10, "ndcg@5": ndcg10 / 2, "ndcg@10": ndcg10, "nll": nll,
            "untied": {"ndcg@10": ndcg10 / 2, "n_users": 5}}
    return {"n_test_users": 7, "test": test, "valid": {"ndcg@10": valid_ndcg10, "nll": nll + 0.5}}


def test_paired_contrasts_count_the_seeds_where_the_block_helps():
    sets = feature_sets("/nonexistent", with_text=True)
    results = {"genres_year": {0: _decoder_metrics(0.030, 0.03), 1: _decoder_metrics(0.040, 0.04),
                               2: _decoder_metrics(0.050, 0.05)},
               "poster": {0: _decoder_metrics(0.035, 0.02), 1: _decoder_metrics(0.038, 0.05),
                          2: _decoder_metrics(0.056, 0.06)}}
    summary = summarise(results, sets)
    assert summary["poster"]["extra"]["valid nll"]["mean"] == pytest.approx(7.5)
    assert summary["poster"]["extra"]["untied ndcg@10"]["mean"] == pytest.approx((0.035 + 0.038 + 0.056) / 6)
    (row,) = contrasts(summary)                      # only the pair whose both sets ran
    assert (row["with"], row["without"]) == ("poster", "genres_year")
    assert row["ndcg@10"]["per_seed"] == pytest.approx([0.005, -0.002, 0.006])
    assert row["ndcg@10"]["n_positive"] == 2 and row["valid ndcg@10"]["n_positive"] == 2
    assert row["ndcg@10"]["mean"] == pytest.approx(0.003)
    table = markdown_table(summary)
    assert "| valid ndcg@10 | valid nll |" in table
    assert "| +poster over genres, year | +0.0030 ± 0.0044 | +0.0050 / -0.0020 / +0.0060 | 2/3 |" in table
    summary["genres_year"]["per_seed"] = {}            # no seed in common: no contrast, not a NaN
    assert contrasts(summary) == []


def test_sasrec_reference_row_and_ratio_from_the_runs_seed_folders(tmp_path, monkeypatch):
    import experiments.ablation as ablation
    sets = feature_sets("/nonexistent")
    summary = summarise({"poster": {0: _decoder_metrics(0.03, 0.03), 1: _decoder_metrics(0.05, 0.05)}}, sets)
    sasrec = {0: _decoder_metrics(0.06, 0.06), 1: _decoder_metrics(0.05, 0.05)}
    ablation.add_reference(summary, sasrec)
    assert summary["poster"]["extra"]["÷ SASRec ndcg@10"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["_reference"]["sasrec"]["mean"]["ndcg@10"] == pytest.approx(0.055)
    table = markdown_table(summary)
    assert "| SASRec-CE (reference), seeds 0,1 | - | " in table and "÷ SASRec ndcg@10" in table
    one_seed = summarise({"poster": {0: _decoder_metrics(0.03, 0.03), 1: _decoder_metrics(0.05, 0.05)}}, sets)
    ablation.add_reference(one_seed, {0: sasrec[0]})      # SASRec lacks seed 1: no ratio; its row has no ±
    assert "÷ SASRec ndcg@10" not in one_seed["poster"]["extra"]
    assert "| SASRec-CE (reference), seeds 0 | - | 0.0600 | " in markdown_table(one_seed)
    # the run's seed folders: seed 0 is RUN/baselines, seed s RUN/seed<s>/baselines, each checked as current;
    # a stale one (here seed 2) or one with ndcg@10 0 (seed 3) is left out with a warning, not an error
    run = tmp_path / "run"
    for seed, ndcg in ((0, 0.06), (2, 0.05), (3, 0.0)):
        folder = run / ("baselines" if seed == 0 else f"seed{seed}/baselines") / "sasrec"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(f'{{"n_test_users": 7, "seed": {seed}, "test": {{"ndcg@10": {ndcg}}}}}')

    def check(result, path, run_dir):
        if result["seed"] == 2:
            raise ablation.ArtifactError(f"{path} was trained on other interactions")
    monkeypatch.setattr("experiments.baselines.check_result_is_current", check)
    assert sorted(ablation.reference_sasrec(run, [0, 1, 2, 3])) == [0]


def test_the_adaptive_fusion_is_chosen_on_validation_not_test(tmp_path, monkeypatch):
    import importlib.util
    import json

    from experiments.ablation import fusion_comparison

    sets = feature_sets("/nonexistent")

    def ablation_of(test, valid):
        return summarise({"all": {s: _decoder_metrics(t, v) for s, (t, v) in enumerate(zip(test, valid))}}, sets)
    summaries = {"concat": ablation_of([0.05, 0.05], [0.03, 0.03]),
                 "gated": ablation_of([0.04, 0.04], [0.06, 0.05]),       # better on validation, worse on test
                 "attention": ablation_of([0.07, 0.07], [0.04, 0.04])}   # the test split's favourite
    comparison = fusion_comparison(summaries, "all")
    assert comparison["chosen_adaptive"] == "gated"
    assert comparison["fusions"]["gated"]["valid ndcg@10"]["mean"] == pytest.approx(0.055)
    with pytest.raises(ValueError, match="feature set 'poster' is not in the concat ablation"):
        fusion_comparison(summaries, "poster")
    folders = []   # the CLI over ablation folders
    for fusion, summary in summaries.items():
        (tmp_path / fusion).mkdir()
        (tmp_path / fusion / "ablation.json").write_text(json.dumps(summary))
        folders.append(f"{fusion}={tmp_path / fusion}")
    spec = importlib.util.spec_from_file_location("ablation_script", REPO / "experiments" / "09_ablation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["09_ablation.py", "--run", str(tmp_path), "--sets", "all", "--compare-fusions",
                                      ",".join(folders), "--out", str(tmp_path / "out")])
    script.main()
    table = (tmp_path / "out" / "fusions.md").read_text()
    assert "chosen on validation ndcg@10: **gated**" in table and "| attention | 0,1 | 0.0700 ± 0.0000 |" in table
    monkeypatch.setattr(sys, "argv", ["09_ablation.py", "--run", str(tmp_path), "--sets", "all"])
    with pytest.raises(SystemExit):   # training needs its configs and data
        script.main()
