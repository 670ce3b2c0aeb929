"""Baselines: popularity from training events only, SASRec windows and causality, SASRec learning a
deterministic pattern, validation-based checkpoint selection, resume after a kill, the step's outputs."""
import math
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
import torch

from experiments import baselines
from experiments.artifacts import StaleOutputError, ArtifactError, load_json, save_npy, save_npz
from modules.metrics import ranking_metrics
from modules.popularity import MostPopular, item_popularity, popularity_log_likelihood, training_event_mask
from modules.sasrec import PAD, SASRec, left_padded_windows, training_windows
from modules.split import leave_one_out

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = dict(hidden_dim=32, n_layers=1, n_heads=2, max_len=16, dropout=0.0, ffn_dim=64)
TINY_TRAIN = dict(epochs=4, batch_size=64, learning_rate=0.005, weight_decay=0.0, patience=2, seed=0,
                  eval_batch_size=64)


def write_run(run: Path, histories: list, n_items: int) -> Path:
    """A run folder in the documented format (item_ids.npy, interactions.npz) from lists of item rows."""
    lengths = [len(h) for h in histories]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    save_npy(run / "item_ids.npy", np.arange(1, n_items + 1, dtype=np.int64) * 10)
    save_npz(run / "interactions.npz", user_ids=np.arange(1, len(histories) + 1, dtype=np.int64),
             offsets=offsets, item_index=np.concatenate(histories).astype(np.int32),
             timestamps=np.arange(offsets[-1], dtype=np.int64), ratings=np.full(offsets[-1], 4.0, np.float32))
    return run


def pattern_histories(n_users: int, n_items: int, seed: int = 0) -> list:
    """Histories where item i is always followed by item i + 1 (mod n_items), random start and length."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(n_items) + np.arange(rng.integers(8, 16))) % n_items for _ in range(n_users)]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


# ---------------------------------------------------------------- popularity

HAND_MADE = [np.array([0, 1, 2, 3]), np.array([1, 2, 4]), np.array([2, 0, 1, 4, 3])]


def test_popularity_log_likelihood_known_answer():
    counts = np.array([3, 0, 1])  # smoothed: 4, 1, 2 of 7
    np.testing.assert_allclose(popularity_log_likelihood(counts, np.array([0, 1, 2, 0])),
                               np.log([4 / 7, 1 / 7, 2 / 7, 4 / 7]))
    assert np.exp(popularity_log_likelihood(counts, np.arange(3), smoothing=0.5)).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smoothing"):
        popularity_log_likelihood(counts, np.arange(3), smoothing=0)
    with pytest.raises(ValueError, match="item rows"):
        popularity_log_likelihood(counts, np.array([0, -1]))


def test_popularity_counts_training_events_only():
    offsets = np.array([0, 4, 7, 12])
    split = leave_one_out(offsets)
    counts = item_popularity(np.concatenate(HAND_MADE), split, n_items=5)
    # training parts: [0, 1], [1], [2, 0, 1]; the validation/test items 3 and 4 count nothing.
    assert counts.tolist() == [2, 3, 1, 0, 0]
    ranked = MostPopular(counts).recommend([np.array([1])], k=5)
    assert ranked.tolist() == [[0, 2, 3, 4, -1]]  # seen item 1 excluded, tie 3/4 by row, padded


def test_training_event_mask_is_all_but_the_last_two_events_of_each_user():
    rng = np.random.default_rng(1)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(3, 9, size=20))])
    mask = training_event_mask(leave_one_out(offsets), int(offsets[-1]))
    expected = np.ones(offsets[-1], dtype=bool)
    expected[offsets[1:] - 1] = expected[offsets[1:] - 2] = False
    assert np.array_equal(mask, expected)


def test_evaluate_popularity_known_answer(tmp_path):
    run = write_run(tmp_path / "run", HAND_MADE, n_items=5)
    result = baselines.evaluate_popularity(run)
    assert result["n_test_users"] == 3
    # valid: targets 2, 2, 4 ranked at 0, 1, 1;  test: targets 3, 4, 3 ranked at 0, 2, 0 (hand-derived).
    assert result["valid"]["recall@5"] == 1.0
    assert result["valid"]["ndcg@5"] == pytest.approx((1 + 2 / math.log2(3)) / 3)
    assert result["test"]["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1) / 3)


# ---------------------------------------------------------------- SASRec data and model

def test_training_windows_cover_every_transition_once():
    rng = np.random.default_rng(2)
    histories = [rng.permutation(100)[:n] for n in rng.integers(1, 40, size=30)]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    item_index = np.concatenate(histories)
    windows = training_windows(item_index, offsets[:-1], offsets[1:], max_len=7)
    assert windows.shape[1] == 8
    pairs = sorted((int(a), int(b)) for w in windows for a, b in zip(w[:-1], w[1:]) if a != PAD)
    expected = sorted((int(a) + 1, int(b) + 1) for h in histories for a, b in zip(h[:-1], h[1:]))
    assert pairs == expected
    # left padding only: once a real token appears, the rest of the window is real.
    real = windows != PAD
    assert np.all(np.diff(real.astype(int), axis=1) >= 0)


def test_training_windows_cap_keeps_the_most_recent():
    item_index = np.arange(30)
    capped = training_windows(item_index, np.array([0]), np.array([30]), max_len=4, max_windows_per_user=2)
    assert capped.tolist() == [[26, 27, 28, 29, 30], [22, 23, 24, 25, 26]]


def test_left_padded_windows_keeps_the_last_items():
    item_index = np.array([5, 6, 7, 8, 9])
    tokens = left_padded_windows(item_index, np.array([0, 3]), np.array([5, 4]), width=3)
    assert tokens.tolist() == [[8, 9, 10], [0, 0, 9]]


def test_sasrec_is_causal_and_handles_padding():
    torch.manual_seed(0)
    model = SASRec(n_items=20, **TINY_MODEL).eval()
    tokens = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    changed = tokens.clone()
    changed[:, -1] = 9
    with torch.no_grad():
        hidden, hidden_changed = model(tokens), model(changed)
    assert torch.isfinite(hidden).all()
    assert torch.allclose(hidden[:, :-1], hidden_changed[:, :-1], atol=1e-6)
    assert not torch.allclose(hidden[:, -1], hidden_changed[:, -1])
    assert model.score_next(tokens).shape == (2, 20)
    # The loss only scores real transitions: a target after a PAD input does not count.
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    loss = model.loss(inputs, targets)
    targets[0, 1] = 17  # input PAD -> target changed
    assert torch.equal(model.loss(inputs, targets), loss)
    targets[1, 1] = 17  # a real transition changed
    assert not torch.equal(model.loss(inputs, targets), loss)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_chunked_cross_entropy_equals_the_full_one_in_value_and_gradients():
    from modules.sasrec import chunked_cross_entropy
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, targets, max_logits=50 * 6)   # 7 chunks of 6 rows (last 1)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b)
    # And inside the model: the same loss whichever path it takes.
    model = SASRec(n_items=30, hidden_dim=8, n_layers=1, n_heads=2, max_len=6, dropout=0.0).eval()
    tokens = torch.randint(1, 31, (5, 7), generator=generator)
    tokens[0, :3] = 0
    direct = model.loss(tokens[:, :-1], tokens[:, 1:])
    model.max_loss_logits = 30 * 4
    torch.testing.assert_close(model.loss(tokens[:, :-1], tokens[:, 1:]), direct)


def test_sasrec_scores_the_catalogue_in_float32_under_bf16_autocast():
    # bf16 logits tie inside the top 10 of a large catalogue; ties would then be decided by item row.
    torch.manual_seed(0)
    model = SASRec(n_items=20, **TINY_MODEL).eval()
    tokens = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.score_next(tokens)
        hidden = model(tokens)[:, -1].float()
    expected = hidden @ model.item_embedding.weight[1:].T.float()
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- SASRec training

def test_sasrec_learns_a_deterministic_pattern_far_above_popularity(tmp_path):
    run = write_run(tmp_path / "run", pattern_histories(200, 40), n_items=40)
    gin.parse_config("\n".join([f"SASRec.{k} = {v!r}" for k, v in TINY_MODEL.items()] +
                               [f"train_sasrec.{k} = {v!r}" for k, v in {**TINY_TRAIN, "epochs": 6}.items()]))
    summary = baselines.run_baselines(run, models=["popularity", "sasrec"], sasrec_config=_empty_gin(tmp_path))
    sasrec, popularity = summary["models"]["sasrec"], summary["models"]["popularity"]
    assert summary["n_test_users"] == 200
    assert sasrec["test"]["recall@5"] >= 0.95, sasrec
    assert sasrec["test"]["ndcg@10"] >= 0.8, sasrec
    assert sasrec["test"]["recall@5"] >= popularity["test"]["recall@5"] + 0.5, (sasrec, popularity)
    assert load_json(run / "baselines" / "metrics.json", "-") == summary
    out = run / "baselines" / "sasrec"
    assert {"best.pt", "last.pt", "config.gin", "train.log", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert "SASRec.hidden_dim = 32" in (out / "config.gin").read_text()
    assert "device: cpu" in (out / "train.log").read_text()
    interactions, n_items, split = baselines.load_run(run)
    nll, ranked = baselines.sasrec_scores(baselines.load_sasrec(out / "best.pt", interactions), interactions, split,
                                          "test", k=10, batch_size=64)
    assert nll < math.log(n_items) - 1
    # The same ranking as the harness that wrote metrics.json (which uses batches of eval_batch_size).
    flat = {k: v for k, v in sasrec["test"].items() if k != "untied"}
    assert ranking_metrics(ranked, interactions.item_index[split.test_pos]) == pytest.approx(flat)


def test_sasrec_nll_of_a_blind_model_is_log_catalogue_size(tmp_path):
    run = write_run(tmp_path / "run", pattern_histories(20, 40), n_items=40)
    interactions, n_items, split = baselines.load_run(run)
    model = SASRec(n_items=n_items, **TINY_MODEL)
    with torch.no_grad():
        model.item_embedding.weight.zero_()  # every item logit 0: the uniform distribution
    torch.save({"model": model.state_dict(), "hyperparameters": {"n_items": n_items, "model": TINY_MODEL}},
               tmp_path / "best.pt")
    nll, _ = baselines.sasrec_scores(baselines.load_sasrec(tmp_path / "best.pt", interactions), interactions, split,
                                     "valid", batch_size=7)
    assert nll == pytest.approx(math.log(n_items), rel=1e-6)
    smaller = SASRec(n_items=n_items - 5, **TINY_MODEL)
    torch.save({"model": smaller.state_dict(), "hyperparameters": {"n_items": n_items - 5, "model": TINY_MODEL}},
               tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="another run folder"):
        baselines.load_sasrec(tmp_path / "other.pt", interactions)


def _empty_gin(tmp_path: Path) -> Path:
    """A config file with no bindings (the test binds through gin.parse_config first)."""
    path = tmp_path / "empty.gin"
    path.write_text("# bindings come from the test\n")
    return path


class ScriptedValidation:
    """Replaces evaluate_sasrec: scripted validation scores per epoch, and a record of the weights each
    evaluation saw, so the test can tell which checkpoint the test split was scored with."""

    def __init__(self, valid_ndcg: list, interrupt_at_epoch: int | None = None):
        self.valid_ndcg = valid_ndcg
        self.interrupt_at_epoch = interrupt_at_epoch
        self.calls = []  # (split name, weight fingerprint)

    def __call__(self, model, interactions, split, name, device, batch_size):
        fingerprint = float(sum(p.detach().double().sum() for p in model.parameters()))
        self.calls.append((name, fingerprint))
        if name == "test":
            return dict.fromkeys(baselines.METRIC_NAMES, 0.0)
        epoch = sum(1 for n, _ in self.calls if n == "valid")
        if epoch == self.interrupt_at_epoch:
            raise KeyboardInterrupt("simulated kill")
        return {**dict.fromkeys(baselines.METRIC_NAMES, 0.0), "ndcg@10": self.valid_ndcg[epoch - 1]}


def _train(run: Path, out: Path, **overrides) -> dict:
    return baselines.train_sasrec(run, out, **{**TINY_TRAIN, **overrides}, model_config=TINY_MODEL)


def test_best_epoch_is_chosen_by_validation_and_test_runs_once_with_it(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", pattern_histories(50, 30), n_items=30)
    scripted = ScriptedValidation([0.1, 0.5, 0.3, 0.2, 0.9])
    monkeypatch.setattr(baselines, "evaluate_sasrec", scripted)
    result = _train(run, tmp_path / "sasrec", epochs=5, patience=2)
    names = [name for name, _ in scripted.calls]
    # epochs 3 and 4 bring no gain -> early stop before epoch 5 (whose 0.9 is never seen).
    assert names == ["valid"] * 4 + ["test"]
    assert result["best_epoch"] == 2 and result["epochs_run"] == 4
    assert result["valid"]["ndcg@10"] == 0.5
    weights_at_epoch_2, weights_at_test = scripted.calls[1][1], scripted.calls[-1][1]
    assert weights_at_test == weights_at_epoch_2 != scripted.calls[3][1]


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", pattern_histories(50, 30), n_items=30)
    monkeypatch.setattr(baselines, "evaluate_sasrec", ScriptedValidation([0.1, 0.2, 0.3, 0.4]))
    uninterrupted = _train(run, tmp_path / "a")

    monkeypatch.setattr(baselines, "evaluate_sasrec", ScriptedValidation([0.1, 0.2, 0.3, 0.4], interrupt_at_epoch=3))
    with pytest.raises(KeyboardInterrupt):
        _train(run, tmp_path / "b")
    assert not (tmp_path / "b" / "metrics.json").exists()
    resumed_eval = ScriptedValidation([0.3, 0.4])  # epochs 3 and 4 only
    monkeypatch.setattr(baselines, "evaluate_sasrec", resumed_eval)
    resumed = _train(run, tmp_path / "b")
    assert [name for name, _ in resumed_eval.calls] == ["valid", "valid", "test"]
    assert resumed["best_epoch"] == uninterrupted["best_epoch"] == 4
    a = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)

    # A finished run is skipped for the same inputs and config, refused for others; another config on an
    # unfinished one is refused too.
    monkeypatch.setattr(baselines, "train_one_epoch", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert _train(run, tmp_path / "b")["best_epoch"] == 4
    with pytest.raises(StaleOutputError, match="config train learning_rate: 0.005 -> 0.01"):
        _train(run, tmp_path / "b", learning_rate=0.01)
    inter = dict(np.load(run / "interactions.npz"))
    inter["item_index"] = inter["item_index"][::-1].copy()   # other data in the same run folder
    np.savez(run / "interactions.npz", **inter)
    with pytest.raises(StaleOutputError, match="input interactions.npz changed"):
        _train(run, tmp_path / "b")
    np.savez(run / "interactions.npz", **{**inter, "item_index": inter["item_index"][::-1].copy()})
    assert _train(run, tmp_path / "b")["best_epoch"] == 4     # the same data again: reused
    (tmp_path / "b" / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match="--overwrite"):
        _train(run, tmp_path / "b", learning_rate=0.01)


def test_sasrec_trains_on_training_events_only(tmp_path, monkeypatch):
    # Each user's last two items (validation, test) are items no other event uses: rows 30 and up.
    histories = [np.r_[h, 30 + 2 * u, 31 + 2 * u] for u, h in enumerate(pattern_histories(20, 30))]
    run = write_run(tmp_path / "run", histories, n_items=70)
    seen_windows = []
    monkeypatch.setattr(baselines, "train_one_epoch", lambda model, windows, *a, **k: seen_windows.append(windows) or 0.0)
    monkeypatch.setattr(baselines, "evaluate_sasrec", ScriptedValidation([0.1]))
    _train(run, tmp_path / "sasrec", epochs=1)
    tokens = seen_windows[0]
    assert tokens.max() == 30  # item row 29 + 1: no validation or test item reaches training
    pairs = sorted((int(a), int(b)) for w in tokens for a, b in zip(w[:-1], w[1:]) if a != PAD)
    assert pairs == sorted((int(a) + 1, int(b) + 1) for h in histories for a, b in zip(h[:-3], h[1:-2]))


def test_sasrec_configs_parse_and_bind_every_parameter(monkeypatch):
    monkeypatch.chdir(REPO)  # configs include their base relative to the repository root
    for path in sorted((REPO / "configs").glob("sasrec_*.gin")):
        gin.clear_config()
        gin.parse_config_file(str(path))
        model = baselines.sasrec_model_config()
        assert model["hidden_dim"] % model["n_heads"] == 0, path
        for name in ("epochs", "batch_size", "learning_rate", "weight_decay", "patience", "seed",
                     "eval_batch_size", "monitor"):
            gin.query_parameter(f"train_sasrec.{name}")


def test_run_baselines_rejects_unknown_models_and_missing_config(tmp_path):
    run = write_run(tmp_path / "run", HAND_MADE, n_items=5)
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.run_baselines(run, models=["itemknn"])
    with pytest.raises(ValueError, match="--sasrec-config"):
        baselines.run_baselines(run, models=["sasrec"])
    with pytest.raises(ArtifactError, match="nowhere/item_ids.npy, is missing"):
        baselines.run_baselines(tmp_path / "nowhere", models=["popularity"])


def test_train_baselines_script_exits_with_a_clear_error(tmp_path):
    run = write_run(tmp_path / "run", HAND_MADE, n_items=5)
    done = subprocess.run([sys.executable, "experiments/07_train_baselines.py", "--run", str(run),
                           "--models", "popularity,itemknn"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "unknown baseline(s) ['itemknn']" in done.stderr
    assert not (run / "baselines").exists()
