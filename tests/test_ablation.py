"""The ablation summary: feature sets follow the data, statistics and table are right."""
from __future__ import annotations

import pytest

from experiments.ablation import feature_sets, markdown_table, run_ablation, summarise


def test_genome_joins_metadata_sets_only_when_present(tmp_path):
    sets = feature_sets(tmp_path)
    assert sets["text"].blocks == ("genres", "year", "tags") and "poster" not in sets["text"].blocks
    (tmp_path / "genome-scores.csv").write_text("movieId,tagId,relevance\n")
    sets = feature_sets(tmp_path, with_text=True)
    assert sets["all"].blocks == ("genres", "year", "tags", "genome", "text", "poster")
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
