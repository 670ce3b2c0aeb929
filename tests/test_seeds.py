"""Headline numbers over seeds: collecting every seed's models, mean ± std, refusing mismatched results."""
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.artifacts import ArtifactError, file_digest, save_json, save_npy
from experiments.baselines import METRIC_NAMES, semantic_ids_digest
from experiments.seeds import seed_folder, summarise_run

IDS = np.array([[0, 0], [1, 0]], dtype=np.int64)


def metrics(value: float, n_users: int = 10) -> dict:
    flat = dict.fromkeys(METRIC_NAMES, value) | {"nll": 8.0 - value}
    return flat | {"untied": dict.fromkeys(METRIC_NAMES, value / 2) | {"n_users": 7}}


def write_seed(run: Path, seed: int, tiger: float, sasrec: float, n_users: int = 10) -> None:
    folder = seed_folder(run, seed)
    folder.mkdir(parents=True, exist_ok=True)
    if not (run / "interactions.npz").is_file():
        np.savez(run / "interactions.npz", offsets=np.array([0, 3]), item_index=np.zeros(3, np.int32))
    trained_on = {"fingerprint": {"inputs": {"interactions.npz": file_digest(run / "interactions.npz")}}}
    ids = IDS + seed
    save_npy(folder / "rqvae" / "semantic_ids.npy", ids)
    for name, value, model in (("decoder", tiger, "tiger"), ("decoder_random_ids", tiger / 2, "tiger_random_ids")):
        save_json(folder / name / "metrics.json", {
            "model": model, "n_test_users": n_users, "valid": metrics(value), "test": metrics(value),
            "semantic_ids": "random" if "random" in name else str(folder / "rqvae"),
            "semantic_ids_sha1": semantic_ids_digest(ids), **trained_on})
    save_json(folder / "baselines" / "sasrec" / "metrics.json",
              {"n_test_users": n_users, "valid": metrics(sasrec), "test": metrics(sasrec), **trained_on})
    if seed == 0:
        save_json(folder / "baselines" / "popularity" / "metrics.json",
                  {"n_test_users": n_users, "valid": metrics(0.01), "test": metrics(0.01), **trained_on})


def test_mean_and_sample_std_over_seeds(tmp_path):
    run = tmp_path / "run"
    for seed, tiger in enumerate([0.1, 0.2, 0.3]):
        write_seed(run, seed, tiger, sasrec=0.4)
    summary = summarise_run(run, [0, 1, 2])
    tiger = summary["models"]["tiger"]
    assert tiger["seeds"] == [0, 1, 2]
    assert tiger["ndcg@10"]["mean"] == pytest.approx(0.2) and tiger["ndcg@10"]["std"] == pytest.approx(0.1)
    assert tiger["untied ndcg@10"]["mean"] == pytest.approx(0.1)
    assert tiger["test nll"]["mean"] == pytest.approx(7.8)
    assert summary["models"]["popularity"]["seeds"] == [0]      # no seed: one value
    assert summary["tiger_over_sasrec_ndcg@10"]["mean"] == pytest.approx(0.5)
    # Another decoder folder per seed (say the long preset): collected under its own name.
    for seed in (0, 1, 2):
        folder = seed_folder(run, seed)
        (folder / "decoder_long").mkdir()
        (folder / "decoder_long" / "metrics.json").write_text((folder / "decoder" / "metrics.json").read_text())
    summary = summarise_run(run, [0, 1, 2], {"tiger_long": "decoder_long"})
    assert summary["models"]["tiger_long"]["ndcg@10"] == summary["models"]["tiger"]["ndcg@10"]
    assert "tiger_long test ndcg@10 as a fraction" in (run / "seeds.md").read_text()
    table = (run / "seeds.md").read_text()
    assert "| tiger | 0.2000 ± 0.1000 | 0.2000 ± 0.1000 | 0.1000 ± 0.0500 |" in table
    assert json.loads((run / "seeds.json").read_text()) == json.loads(json.dumps(summary))


def test_missing_seed_mismatched_users_and_stale_ids_are_errors(tmp_path):
    run = tmp_path / "run"
    write_seed(run, 0, 0.1, 0.4)
    with pytest.raises(ArtifactError, match="seed1/decoder/metrics.json is missing"):
        summarise_run(run, [0, 1])
    write_seed(run, 1, 0.1, 0.4, n_users=11)
    with pytest.raises(ArtifactError, match="11 test users, other seeds 10"):
        summarise_run(run, [0, 1])
    write_seed(run, 1, 0.1, 0.4)
    save_npy(seed_folder(run, 1) / "rqvae" / "semantic_ids.npy", IDS[::-1].copy())  # RQ-VAE re-run since
    with pytest.raises(ArtifactError, match="other semantic IDs"):
        summarise_run(run, [0, 1])
