"""train_rqvae.py: gin configs, input-width check, a 2-step CPU run, ID reproducibility after reload,
fingerprints of finished runs, and the collapse guard."""
from __future__ import annotations

import json
from pathlib import Path

import gin
import numpy as np
import pytest
import torch

import train_rqvae
from experiments.artifacts import ArtifactError, StaleOutputError
from experiments.ml25m import BLOCK_NAMES, fuse_item_features
from tests.test_fusion import make_fixture

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("rqvae_*.gin"))
TINY = ["RQVAE.hidden_dims = [16, 8]", "RQVAE.embed_dim = 4", "RQVAE.codebook_size = 8",
        "train_rqvae.batch_size = 16", "train_rqvae.kmeans_sample = 64", "train_rqvae.log_every = 1", "train_rqvae.eval_every = 1",
        "train_rqvae.checkpoint_every = 1", "train_rqvae.cpu_threads = 1"]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def fused_run(tmp_path) -> Path:
    fx = make_fixture(tmp_path, n_items=60)
    fuse_item_features(fx["run"], root=fx["data"], poster_feature_path=fx["posters"],
                       blocks=["genres", "year", "tags", "poster"])
    return fx["run"]


def training_args(run: Path, extra: list[str] = (), iterations: int = 2, overwrite: bool = True) -> list[str]:
    args = [str(CONFIGS[0].parent / "rqvae_demo.gin"), "--run", str(run), *(["--overwrite"] if overwrite else [])]
    for binding in [*TINY, f"train_rqvae.iterations = {iterations}", *extra]:
        args += ["--gin_param", binding]
    return args


def run_training(run: Path, extra: list[str] = (), iterations: int = 2, overwrite: bool = True) -> dict:
    """train_rqvae's command line, errors raised as they are (main() turns ArtifactErrors into an exit)."""
    gin.clear_config()
    return train_rqvae.run_cli(training_args(run, extra, iterations, overwrite))


def test_configs_exist():
    assert {c.name for c in CONFIGS} >= {"rqvae_ml25m.gin", "rqvae_ml_small.gin", "rqvae_demo.gin"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_rqvae_config_parses_with_valid_values(config):
    train_rqvae.parse_config([str(config)])
    assert gin.query_parameter("RQVAE.n_levels") == 3
    assert gin.query_parameter("RQVAE.embed_dim") == 32
    assert gin.query_parameter("train_rqvae.input_dim") in (None, 0)
    assert set(gin.query_parameter("ML25MItemData.blocks")) <= set(BLOCK_NAMES)
    assert set(gin.query_parameter("ML25MItemData.block_weights")) <= set(BLOCK_NAMES)


def test_a_binding_to_a_missing_parameter_fails_at_parse_time():
    with pytest.raises(ValueError, match="codebook_sizee"):
        train_rqvae.parse_config([str(CONFIGS[0])], ["RQVAE.codebook_sizee = 3"])


def test_wrong_input_width_is_an_error_with_both_numbers(fused_run):
    width = np.load(fused_run / "item_features" / "features.npy").shape[1]
    with pytest.raises(ValueError, match=rf"input_dim = 2068 .* has {width} columns"):
        run_training(fused_run, ["train_rqvae.input_dim = 2068"])


def test_two_step_run_writes_every_output_and_ids_survive_a_reload(fused_run):
    report = run_training(fused_run, ["train_rqvae.input_dim = None"])
    out = fused_run / "rqvae"
    for name in ("model.pt", "config.gin", "log.jsonl", "log.csv", "curves.png", "semantic_ids.npy",
                 "movie_ids.npy", "semantic_ids.json", "health.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()
    assert "RQVAE.codebook_size = 8" in (out / "config.gin").read_text()
    ids = np.load(out / "semantic_ids.npy")
    item_ids = np.load(fused_run / "item_ids.npy")
    assert ids.shape == (len(item_ids), 4) and ids.dtype == np.int64
    assert len(np.unique(ids, axis=0)) == len(ids)
    np.testing.assert_array_equal(np.load(out / "movie_ids.npy"), item_ids)
    sizes = json.loads((out / "semantic_ids.json").read_text())["codebook_sizes"]
    assert sizes[:3] == [8, 8, 8] and sizes[3] == ids[:, 3].max() + 1
    health = json.loads((out / "health.json").read_text())
    assert health == json.loads(json.dumps(report))
    assert len(health["usage"]) == 3 and len(health["perplexity"]) == 3
    assert set(health["reconstruction_error"]) == {"genres", "year", "tags", "poster"}
    for key in ("unique_fraction", "max_collision_group", "collapsed", "genre_jaccard"):
        assert key in health
    assert len(Path(out / "log.jsonl").read_text().splitlines()) == 2
    np.testing.assert_array_equal(train_rqvae.semantic_ids_from_checkpoint(out, fused_run), ids)


def test_finished_run_is_skipped_and_an_interrupted_one_resumes(fused_run, monkeypatch):
    run_training(fused_run, iterations=3)
    out = fused_run / "rqvae"
    stamp = (out / "model.pt").stat().st_mtime_ns
    run_training(fused_run, iterations=3, overwrite=False)
    assert (out / "model.pt").stat().st_mtime_ns == stamp  # finished: skipped

    # Kill after step 2's checkpoint (steps 1-2 not logged yet), then resume: the log continues.
    logged_every_3 = ["train_rqvae.log_every = 3"]
    real_step, calls = train_rqvae.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_rqvae, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(fused_run, logged_every_3, iterations=4)
    assert (out / "checkpoint.pt").is_file() and not (out / "health.json").exists()
    monkeypatch.setattr(train_rqvae, "train_step", real_step)
    run_training(fused_run, logged_every_3, iterations=4, overwrite=False)
    resumed_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == [3, 4]
    resumed_ids = np.load(out / "semantic_ids.npy")
    resumed_weights = torch.load(out / "model.pt", weights_only=True)["model"]

    # The resumed run is the uninterrupted run: same weights, same IDs, same logged losses.
    run_training(fused_run, logged_every_3, iterations=4)
    np.testing.assert_array_equal(np.load(out / "semantic_ids.npy"), resumed_ids)
    weights = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    uninterrupted_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["total_loss"] for r in uninterrupted_log] == [r["total_loss"] for r in resumed_log]


def kill_after_first_checkpoint(fused_run: Path, monkeypatch, extra: list[str] = ()) -> None:
    """Train (with the gin bindings `extra`) until the first checkpoint is written, then die as a killed run
    would; train_step is restored afterwards."""
    real_step = train_rqvae.train_step

    def dying_step(model, optimizer, batch, reset_dead, generator):
        if (fused_run / "rqvae" / "checkpoint.pt").is_file():
            raise KeyboardInterrupt
        return real_step(model, optimizer, batch, reset_dead, generator)

    monkeypatch.setattr(train_rqvae, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(fused_run, extra, iterations=4)
    monkeypatch.setattr(train_rqvae, "train_step", real_step)
    monkeypatch.setattr(train_rqvae, "train_step", real_step)


def test_resuming_with_another_config_is_an_error(fused_run, monkeypatch):
    kill_after_first_checkpoint(fused_run, monkeypatch)
    with pytest.raises(ArtifactError, match="--overwrite"):
        run_training(fused_run, ["train_rqvae.learning_rate = 0.01"], iterations=4, overwrite=False)


def test_resuming_on_other_features_is_an_error(fused_run, tmp_path, monkeypatch):
    kill_after_first_checkpoint(fused_run, monkeypatch)
    fuse_again_with_other_weights(fused_run, tmp_path)
    with pytest.raises(ArtifactError, match="the input files changed.*--overwrite"):
        run_training(fused_run, iterations=4, overwrite=False)


def fuse_again_with_other_weights(run: Path, root: Path) -> None:
    """Rebuild the run's fused features with another poster weight (same shape, other values)."""
    fuse_item_features(run, overwrite=True, root=root / "data", poster_feature_path=run / "poster_features",
                       blocks=["genres", "year", "tags", "poster"], block_weights={"poster": 2.0})


@pytest.mark.parametrize("change, expected", [
    (["RQVAE.commitment_weight = 0.5"], "config RQVAE.commitment_weight: 0.25 -> 0.5"),
    (["train_rqvae.learning_rate = 0.01"], "config train_rqvae.learning_rate: 0.001 -> 0.01"),
    ("features", "input item_features/features.npy changed"),
], ids=["RQVAE binding", "train_rqvae binding", "features file"])
def test_a_finished_run_is_never_reused_for_other_settings_or_features(fused_run, tmp_path, change, expected):
    first = run_training(fused_run)
    out = fused_run / "rqvae"
    written = (out / "health.json").read_bytes()
    assert set(first["fingerprint"]["inputs"]) == {"item_features/features.npy", "item_features/movie_ids.npy",
                                                   "item_features/blocks.json", "item_ids.npy", "items.csv"}
    extra = [] if change == "features" else change
    if change == "features":
        fuse_again_with_other_weights(fused_run, tmp_path)
    with pytest.raises(StaleOutputError, match=expected) as stale:
        run_training(fused_run, extra, overwrite=False)
    assert "--overwrite" in str(stale.value) and "train_decoder.py" in str(stale.value)
    assert (out / "health.json").read_bytes() == written         # refused, not retrained, not returned
    retrained = run_training(fused_run, extra)                     # --overwrite retrains
    assert retrained["fingerprint"] != first["fingerprint"]
    assert run_training(fused_run, extra, overwrite=False) == json.loads((out / "health.json").read_text())


def test_settings_that_change_no_output_are_not_fingerprinted(fused_run):
    run_training(fused_run)
    stamp = (fused_run / "rqvae" / "model.pt").stat().st_mtime_ns
    run_training(fused_run, ["train_rqvae.cpu_threads = 2", "train_rqvae.checkpoint_every = 5"], overwrite=False)
    assert (fused_run / "rqvae" / "model.pt").stat().st_mtime_ns == stamp


def test_a_collapsed_codebook_writes_its_outputs_then_stops_the_pipeline(fused_run, caplog):
    # One code per level can only mean collapse: 60 items on a single first-level code.
    collapsed = ["RQVAE.codebook_size = 1"]
    with pytest.raises(train_rqvae.CodebookCollapseError, match=r"collapsed: level 0: .*health.json") as stopped:
        run_training(fused_run, collapsed)
    assert "--allow-collapsed" in str(stopped.value) and "train_rqvae.iterations" in str(stopped.value)
    assert any(r.levelname == "WARNING" and "COLLAPSE" in r.getMessage() for r in caplog.records)
    out = fused_run / "rqvae"
    health = json.loads((out / "health.json").read_text())     # kept for inspection
    assert health["collapsed"] and (out / "semantic_ids.npy").is_file()
    stamp = (out / "health.json").stat().st_mtime_ns

    with pytest.raises(train_rqvae.CodebookCollapseError):        # finished, but not silently reused
        run_training(fused_run, collapsed, overwrite=False)
    gin.clear_config()
    with pytest.raises(SystemExit) as exited:                     # the command line: one line, exit code 1
        train_rqvae.main(training_args(fused_run, collapsed, overwrite=False))
    assert str(exited.value.code).startswith("error: the RQ-VAE collapsed")
    assert "In call to configurable" not in exited.value.code

    # Allowed (flag or binding), the same finished run is reused: the allowance is no part of the fingerprint.
    gin.clear_config()
    report = train_rqvae.main(training_args(fused_run, collapsed, overwrite=False) + ["--allow-collapsed"])
    assert report["collapsed"] and (out / "health.json").stat().st_mtime_ns == stamp
    assert run_training(fused_run, collapsed + ["train_rqvae.allow_collapsed = True"])["collapsed"]
