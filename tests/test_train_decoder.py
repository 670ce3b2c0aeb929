"""train_decoder.py on a tiny synthetic run folder: exact resume, outputs, data contracts, configs."""
import json
from pathlib import Path

import gin
import numpy as np
import pytest
import torch

import train_decoder
from experiments import artifacts
from modules.semantic_ids import add_collision_column
from modules.sequences import (NO_ITEM, matched_random_ids, PAD_TOKEN, Vocabulary, encode_histories, first_training_targets, hash_users,
                               history_windows, semantic_id_tokens, training_windows, window_targets)

REPO = Path(__file__).resolve().parents[1]
CODEBOOK_SIZES = [4, 4, 3]
TINY_MODEL = """
Tiger.embed_dim = 16
Tiger.attn_dim = 16
Tiger.n_heads = 2
Tiger.mlp_dim = 32
Tiger.n_layers = 2
train_decoder.dataset = 'synthetic'
train_decoder.iterations = 8
train_decoder.batch_size = 16
train_decoder.warmup_steps = 2
train_decoder.max_history = 4
train_decoder.n_user_buckets = 7
train_decoder.beam_width = 12
train_decoder.log_every = 2
train_decoder.eval_every = 4
train_decoder.checkpoint_every = 4
train_decoder.eval_batch_size = 8
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(folder: Path, n_items=40, n_users=30, seed=0) -> Path:
    """A run folder as steps 2 and 6 write it: item_ids.npy, interactions.npz and rqvae/ semantic IDs.

    Users walk through consecutive items of one first-level code group, so the data has structure.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    item_ids = np.sort(rng.choice(10_000, n_items, replace=False)).astype(np.int64)
    semantic_ids = np.stack([np.arange(n_items) % 4, rng.integers(0, 4, n_items), np.zeros(n_items, int)], 1)
    for row in range(n_items):  # collision column: 0, 1, 2... among items sharing the first codes
        semantic_ids[row, 2] = sum((semantic_ids[:row, :2] == semantic_ids[row, :2]).all(1))
    lengths = rng.integers(5, 12, n_users)
    histories = [(rng.integers(0, n_items) + 4 * np.arange(n)) % n_items for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    artifacts.save_npy(folder / "item_ids.npy", item_ids)
    artifacts.save_npz(folder / "interactions.npz", user_ids=np.arange(1, n_users + 1, dtype=np.int64) * 3,
                       offsets=offsets, item_index=np.concatenate(histories).astype(np.int32),
                       timestamps=np.arange(offsets[-1], dtype=np.int64), ratings=np.ones(offsets[-1], np.float32))
    artifacts.save_npy(folder / "rqvae" / "semantic_ids.npy", semantic_ids.astype(np.int64))
    artifacts.save_npy(folder / "rqvae" / "movie_ids.npy", item_ids)
    artifacts.save_json(folder / "rqvae" / "semantic_ids.json",
                        {"codebook_sizes": [4, 4, int(semantic_ids[:, 2].max()) + 1]})
    return folder


def run_train(run: Path, out: Path, extra: str = "", **kwargs):
    """Parse the tiny config (plus `extra` bindings) and call train()."""
    gin.clear_config()
    gin.parse_config(TINY_MODEL + extra)
    try:
        return train_decoder.train(str(run), None, str(out), **kwargs)
    finally:
        gin.clear_config()


WINDOWS = "Tiger.causal_encoder = True\ntrain_decoder.targets_per_window = 3\n"
DECODER_ONLY = """train_decoder.architecture = 'decoder_only'
train_decoder.targets_per_window = 4
TigerLM.embed_dim = 16
TigerLM.attn_dim = 16
TigerLM.n_heads = 2
TigerLM.mlp_dim = 32
TigerLM.n_layers = 2
"""
ITEM_STREAM = DECODER_ONLY.replace("decoder_only", "item_stream").replace("TigerLM.", "TigerItemLM.")


@pytest.mark.parametrize("extra", ["", WINDOWS, DECODER_ONLY, ITEM_STREAM],
                         ids=["one_target", "windows_of_3", "decoder_only", "item_stream"])
def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path, extra):
    run = make_run(tmp_path / "run")
    straight = run_train(run, tmp_path / "straight", extra)
    assert run_train(run, tmp_path / "resumed", extra, stop_at_step=3) is None  # stop mid eval window
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = run_train(run, tmp_path / "resumed", extra)
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["history"] == b["history"]


def test_outputs_and_skip_when_finished(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    report = run_train(run, out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["model"] == "tiger" and report["n_test_users"] == 30
    assert report["best_step"] in (4, 8)
    for split in ("valid", "test"):
        assert set(report[split]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "nll", "untied"}
        # No timestamp ties in this fixture: the untied subset is every user.
        assert report[split]["untied"] == {k: v for k, v in report[split].items() if k != "untied"} | {"n_users": 30}
        assert 0 <= report[split]["ndcg@10"] <= report[split]["recall@10"] <= 1
        assert report[split]["recall@5"] <= report[split]["recall@10"]
        assert 0 < report[split]["nll"] < float("inf") and 0 < report["popularity_nll"][split] < float("inf")
    assert 0 <= report["invalid_rate_unconstrained"] <= 1
    for name in ("curves.png", "config.gin", "results.md", "best.pt", "checkpoint.pt", "train.log"):
        assert (out / name).is_file(), name
    assert "Tiger.n_layers = 2" in (out / "config.gin").read_text()
    # The best checkpoint is the one whose validation ndcg@10 (SASRec's criterion too) was highest.
    assert report["select_metric"] == "ndcg@10"
    history = torch.load(out / "checkpoint.pt", weights_only=False)["history"]
    best = max(history["valid"], key=lambda entry: entry[1]["ndcg@10"])
    assert best[0] == report["best_step"] and best[1] == report["valid"]
    assert history["popularity_nll"] == report["popularity_nll"]["valid"]  # every user validates here
    # A finished run is skipped for the same inputs and config only.
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert run_train(run, out) == on_disk
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_a_finished_decoder_is_never_reused_for_another_config_or_other_inputs(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    first = run_train(run, out)
    with pytest.raises(artifacts.StaleOutputError, match=r"config gin.*\n.*It is not reused: pass --overwrite"):
        run_train(run, out, "train_decoder.iterations = 2")
    ids = np.load(run / "rqvae" / "semantic_ids.npy")
    artifacts.save_npy(run / "rqvae" / "semantic_ids.npy", ids[::-1].copy())   # the RQ-VAE was re-run
    with pytest.raises(artifacts.StaleOutputError, match=r"input rqvae/semantic_ids.npy changed"):
        run_train(run, out)
    again = run_train(run, out, overwrite=True)
    assert again["semantic_ids_sha1"] != first["semantic_ids_sha1"]
    assert again["fingerprint"]["inputs"]["rqvae/semantic_ids.npy"] != first["fingerprint"]["inputs"]["rqvae/semantic_ids.npy"]


def test_random_ids_baseline_replaces_codes(tmp_path):
    run = make_run(tmp_path / "run")
    real = train_decoder.load_semantic_ids(run, run / "rqvae", None, random_ids=False, seed=0)[0]
    fake, sizes = train_decoder.load_semantic_ids(run, run / "rqvae", None, random_ids=True, seed=0)
    assert list(sizes) == [4, 4, int(fake[:, 2].max()) + 1]
    assert fake.shape == real.shape and not np.array_equal(fake, real)
    assert len(np.unique(fake, axis=0)) == len(fake) and (fake < np.array(sizes)).all()
    report = run_train(run, tmp_path / "out", "train_decoder.random_ids = True\ntrain_decoder.iterations = 4")
    assert report["model"] == "tiger_random_ids" and report["semantic_ids"] == "random"


@pytest.mark.parametrize("n_items,code_sizes", [(3000, (8, 8, 8)), (9742, (256, 256, 256))])
def test_random_id_control_follows_the_collision_rule_of_real_ids(n_items, code_sizes):
    """The control's codes are uniform and its collision column is the RQ-VAE IDs' rule applied to them:
    with 256^3 tuples almost every item gets collision code 0, as real IDs do (not a uniform column)."""
    ids = matched_random_ids(n_items, code_sizes, seed=5)
    np.testing.assert_array_equal(ids, add_collision_column(ids[:, :-1]))
    assert len(np.unique(ids, axis=0)) == n_items
    expected_counts = n_items / code_sizes[0]   # uniform codes: Poisson-like counts per code
    counts = np.bincount(ids[:, 0], minlength=code_sizes[0])
    assert counts.std() < 1.5 * np.sqrt(expected_counts) and counts.min() > 0
    # Share of items with a non-zero collision code: 1 - (share of distinct tuples).
    n_tuples = np.prod(code_sizes)
    expected_collided = 1 - n_tuples / n_items * (1 - (1 - 1 / n_tuples) ** n_items)
    assert abs((ids[:, -1] > 0).mean() - expected_collided) < 0.02
    if n_tuples > 10**6:
        assert (ids[:, -1] == 0).mean() > 0.99
    assert not np.array_equal(ids, matched_random_ids(n_items, code_sizes, seed=6))


def test_resume_refuses_a_checkpoint_trained_on_other_semantic_ids(tmp_path):
    run = make_run(tmp_path / "run")
    assert run_train(run, tmp_path / "out", stop_at_step=2) is None
    ids = np.load(run / "rqvae" / "semantic_ids.npy")
    ids[[0, 1]] = ids[[1, 0]]  # the RQ-VAE step was re-run: same shape, other assignment
    artifacts.save_npy(run / "rqvae" / "semantic_ids.npy", ids)
    with pytest.raises(ValueError, match="other semantic IDs"):
        run_train(run, tmp_path / "out")


def test_gin_codebook_sizes_that_disagree_with_the_data_is_an_error(tmp_path):
    run = make_run(tmp_path / "run")
    actual = json.loads((run / "rqvae" / "semantic_ids.json").read_text())["codebook_sizes"]
    with pytest.raises(ValueError, match=r"\[8, 4, 3\].*" + str(actual).replace("[", r"\[").replace("]", r"\]")):
        run_train(run, tmp_path / "out", "train_decoder.codebook_sizes = [8, 4, 3]")


def test_misaligned_or_broken_semantic_ids_are_rejected(tmp_path):
    run = make_run(tmp_path / "run")
    movie_ids = np.load(run / "rqvae" / "movie_ids.npy")
    artifacts.save_npy(run / "rqvae" / "movie_ids.npy", movie_ids[::-1].copy())
    with pytest.raises(artifacts.ArtifactError, match="not aligned"):
        train_decoder.load_semantic_ids(run, run / "rqvae", None, False, 0)
    artifacts.save_npy(run / "rqvae" / "movie_ids.npy", movie_ids)
    ids = np.load(run / "rqvae" / "semantic_ids.npy")
    ids[1] = ids[0]
    artifacts.save_npy(run / "rqvae" / "semantic_ids.npy", ids)
    with pytest.raises(artifacts.ArtifactError, match="semantic_ids.npy.*not unique"):
        train_decoder.load_semantic_ids(run, run / "rqvae", None, False, 0)


def test_data_order_covers_each_epoch_once_and_shards_ranks():
    order = train_decoder.DataOrder(n_examples=10, seed=1)
    stream = np.concatenate([order.batch(step, 4) for step in range(5)])  # 20 examples = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    shards = [train_decoder.DataOrder(10, 1).batch(3, 4, rank, 2) for rank in range(2)]
    assert sorted(np.concatenate(shards)) == sorted(order.batch(3, 4))


def test_training_examples_are_every_prefix_of_the_training_history():
    # Two users: events 0..5 (valid at 4) and 6..9 (valid at 8).
    starts, valid = np.array([0, 6]), np.array([4, 8])
    positions = training_windows(first_training_targets(starts, valid, min_history=1), valid, targets_per_window=1)
    assert positions.tolist() == [1, 2, 3, 7]
    item_index = np.array([10, 11, 12, 13, 14, 15, 20, 21, 22, 23])
    windows = history_windows(item_index, np.array([0, 0, 6]), np.array([3, 5, 7]), max_history=3)
    assert windows.tolist() == [[10, 11, 12], [12, 13, 14], [NO_ITEM, NO_ITEM, 20]]


def test_windows_hold_every_target_once_counted_back_from_the_last():
    starts, valid = np.array([0, 10, 20]), np.array([8, 12, 21])  # 7, 1 and 0 targets (min_history 1)
    first = first_training_targets(starts, valid)
    last = training_windows(first, valid, targets_per_window=3)
    assert last.tolist() == [1, 4, 7, 11]  # user 0: targets {1}, {2,3,4}, {5,6,7}; user 1: {11}
    users = np.searchsorted(np.array([0, 10, 20, 21]), last, side="right") - 1
    positions, visible = window_targets(last, first[users], max_history=5, targets_per_window=3)
    present = visible >= 0
    assert sorted(positions[present].tolist()) == [1, 2, 3, 4, 5, 6, 7, 11]
    assert visible.tolist() == [[-1, -1, 5], [3, 4, 5], [3, 4, 5], [-1, -1, 5]]
    with pytest.raises(ValueError, match="targets_per_window"):
        window_targets(last, starts[users] + 1, max_history=2, targets_per_window=3)


def test_target_cap_keeps_each_users_most_recent_targets():
    starts, valid = np.array([0, 10, 20]), np.array([8, 12, 21])  # 7, 1 and 0 targets uncapped
    first = first_training_targets(starts, valid, min_history=1, max_targets_per_user=4)
    assert first.tolist() == [4, 11, 21]
    last = training_windows(first, valid, targets_per_window=3)
    assert last.tolist() == [4, 7, 11]  # user 0: targets {4}, {5,6,7}; user 1: {11}
    users = np.searchsorted(np.array([0, 10, 20, 21]), last, side="right") - 1
    positions, visible = window_targets(last, first[users], max_history=5, targets_per_window=3)
    assert sorted(positions[visible >= 0].tolist()) == [4, 5, 6, 7, 11]
    with pytest.raises(ValueError, match="max_targets_per_user"):
        first_training_targets(starts, valid, max_targets_per_user=0)


@pytest.mark.parametrize("cap", [None, 5])
def test_each_window_target_sees_exactly_the_items_before_it(tmp_path, cap):
    run = make_run(tmp_path / "run")
    data = train_decoder.load_data(run, run / "rqvae", None, False, 0, max_history=4, n_user_buckets=7,
                                   targets_per_window=3, max_targets_per_user=cap)
    offsets, item_index = data.interactions.offsets, data.interactions.item_index
    src, codes, visible = data.training_batch(data.train_positions)
    users = np.searchsorted(offsets, data.train_positions, side="right") - 1
    n_levels = data.vocab.n_levels
    slots = src[:, 1:].reshape(len(src), data.max_history, n_levels)
    targets_seen = 0
    for w, last in enumerate(data.train_positions):
        for t in np.flatnonzero(visible[w] >= 0):
            q = last - (visible.shape[1] - 1 - t)  # target position
            k = visible[w, t]
            history = item_index[max(offsets[users[w]], q - k):q]
            expected = data.item_tokens[history]
            assert np.array_equal(slots[w, k - len(history):k], expected)  # the k slots end right before q
            assert (slots[w, :k - len(history)] == PAD_TOKEN).all()
            assert np.array_equal(codes[w, t], data.semantic_ids[item_index[q]])
            assert data.valid_pos[users[w]] - (cap or len(item_index)) <= q < data.valid_pos[users[w]]
            targets_seen += 1
    per_user = data.valid_pos - offsets[:-1] - 1
    assert targets_seen == (per_user if cap is None else np.minimum(per_user, cap)).sum()


def test_an_unknown_architecture_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="decoder_only"):
        run_train(make_run(tmp_path / "run"), tmp_path / "out", "train_decoder.architecture = 'decoder'")


def test_several_targets_per_window_need_the_causal_encoder(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="causal_encoder"):
        run_train(run, tmp_path / "out", "train_decoder.targets_per_window = 3")


def test_tokens_use_one_slice_per_level_and_pad_history():
    vocab = Vocabulary((4, 4, 3), n_user_buckets=5)
    semantic_ids = np.array([[0, 0, 0], [3, 3, 2]])
    tokens = semantic_id_tokens(semantic_ids, vocab)
    assert tokens.tolist() == [[2, 6, 10], [5, 9, 12]]
    assert vocab.size == 2 + 11 + 5 and vocab.user_token_offset == 13
    src = encode_histories(np.array([[NO_ITEM, 1]]), np.array([14]), tokens)
    assert src.tolist() == [[14, PAD_TOKEN, PAD_TOKEN, PAD_TOKEN, 5, 9, 12]]
    buckets = hash_users(np.arange(10_000), 2000)
    assert buckets.min() >= 0 and buckets.max() < 2000 and len(np.unique(buckets)) > 1900
    assert np.array_equal(buckets, hash_users(np.arange(10_000), 2000))


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("decoder_*.gin")), ids=lambda p: p.name)
def test_decoder_configs_parse_and_build_a_model(config, monkeypatch):
    monkeypatch.chdir(REPO)  # configs include each other by repo-relative path
    gin.clear_config()
    try:
        gin.parse_config_file(str(config))
        assert gin.query_parameter("train_decoder.iterations") > 0
        architecture = gin.query_parameter("train_decoder.architecture") if "architecture" in gin.config_str() \
            else "encoder_decoder"
        model = train_decoder.ARCHITECTURES[architecture](vocab=Vocabulary((256, 256, 256, 8), 2000), max_history=5)
        assert model.src_length == 1 + 5 * 4
        if architecture == "encoder_decoder":
            assert len(model.encoder_layers) == len(model.decoder_layers)
    finally:
        gin.clear_config()


def test_validation_and_test_inputs_hold_no_target_or_later_item(tmp_path):
    run = make_run(tmp_path / "run")
    data = train_decoder.load_data(run, run / "rqvae", None, False, 0, max_history=30, n_user_buckets=7)
    offsets, item_index = data.interactions.offsets, data.interactions.item_index
    n_levels = data.vocab.n_levels
    # Training targets stop before each user's validation item.
    users = np.searchsorted(offsets, data.train_positions, side="right") - 1
    assert (data.train_positions < data.valid_pos[users]).all() and (data.train_positions > offsets[users]).all()
    for name, positions, keep in (("valid", data.valid_pos, 2), ("test", data.test_pos, 1)):
        src = data.encoder_inputs(positions)
        seen = data.seen_items(positions, torch.device("cpu")).numpy()
        for user in range(len(positions)):
            history = item_index[offsets[user]:offsets[user + 1]]
            expected = history[:len(history) - keep]  # valid: h[:n-2], test: h[:n-1]
            items = src[user, 1:].reshape(-1, n_levels)
            items = items[items[:, 0] != PAD_TOKEN]
            assert np.array_equal(items, data.item_tokens[expected]), (name, user)
            assert np.array_equal(np.flatnonzero(seen[user]), np.unique(expected)), (name, user)


def test_window_training_batch_hides_each_target_and_everything_after_it(tmp_path):
    run = make_run(tmp_path / "run")
    data = train_decoder.load_data(run, run / "rqvae", None, False, 0, max_history=4, n_user_buckets=7,
                                   targets_per_window=3)
    torch.manual_seed(0)
    model = train_decoder.Tiger(data.vocab, max_history=4, embed_dim=16, attn_dim=16, n_heads=2, mlp_dim=32,
                                n_layers=2, dropout=0.0, causal_encoder=True).eval()
    src, codes, visible = (torch.as_tensor(a) for a in data.training_batch(data.train_positions[:12]))
    log_probs = model.window_log_probs(src, codes, visible)
    n_levels = data.vocab.n_levels
    for t in range(visible.shape[1]):
        k = visible[:, t].clamp(min=0)
        scrambled = src.clone()
        for w in range(len(src)):  # rewrite the target's own slot and every later one
            scrambled[w, 1 + int(k[w]) * n_levels:] = data.item_tokens[0, 0]
        again = model.window_log_probs(scrambled, codes, visible)
        present = visible[:, t] >= 0
        torch.testing.assert_close(again[present, t], log_probs[present, t])


def make_pattern_run(folder: Path, n_items: int = 40, n_users: int = 200, seed: int = 0) -> Path:
    """A run whose histories follow item i with item i + 1 (mod n_items), random start and length, and whose
    semantic IDs are (i // 8, i % 8, 0): the next item is predictable from the history."""
    rng = np.random.default_rng(seed)
    histories = [(rng.integers(n_items) + np.arange(rng.integers(8, 16))) % n_items for _ in range(n_users)]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64) * 10
    semantic_ids = np.stack([np.arange(n_items) // 8, np.arange(n_items) % 8, np.zeros(n_items, int)], 1)
    artifacts.save_npy(folder / "item_ids.npy", item_ids)
    artifacts.save_npz(folder / "interactions.npz", user_ids=np.arange(1, n_users + 1, dtype=np.int64),
                       offsets=offsets, item_index=np.concatenate(histories).astype(np.int32),
                       timestamps=np.arange(offsets[-1], dtype=np.int64), ratings=np.ones(offsets[-1], np.float32))
    artifacts.save_npy(folder / "rqvae" / "semantic_ids.npy", semantic_ids.astype(np.int64))
    artifacts.save_npy(folder / "rqvae" / "movie_ids.npy", item_ids)
    artifacts.save_json(folder / "rqvae" / "semantic_ids.json", {"codebook_sizes": [5, 8, 1]})
    return folder


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only", "item_stream"])
def test_tiger_learns_a_deterministic_pattern_far_above_popularity(tmp_path, architecture):
    """A short training on a predictable next item: TIGER's test recall@10 is far above most popular's."""
    from experiments.baselines import evaluate_popularity
    run = make_pattern_run(tmp_path / "run")
    model = {"encoder_decoder": "Tiger", "decoder_only": "TigerLM", "item_stream": "TigerItemLM"}[architecture]
    report = run_train(run, tmp_path / "out", "\n".join([
        f"train_decoder.architecture = '{architecture}'", "Tiger.causal_encoder = True",
        f"{model}.embed_dim = 32", f"{model}.attn_dim = 32", f"{model}.mlp_dim = 64", f"{model}.dropout = 0.0",
        f"{model}.n_heads = 2", f"{model}.n_layers = 2",
        "train_decoder.targets_per_window = 4", "train_decoder.max_history = 6",
        "train_decoder.iterations = 150", "train_decoder.batch_size = 32", "train_decoder.learning_rate = 0.005",
        "train_decoder.warmup_steps = 10", "train_decoder.eval_every = 150", "train_decoder.eval_batch_size = 64"]))
    assert report["architecture"] == architecture
    popularity = evaluate_popularity(run)
    assert popularity["test"]["recall@10"] < 0.45, popularity
    assert report["test"]["recall@10"] >= 0.9, report["test"]
    assert report["test"]["recall@10"] >= popularity["test"]["recall@10"] + 0.5
    assert report["test"]["nll"] < report["popularity_nll"]["test"] - 1.0


def test_untied_metrics_cover_exactly_the_untied_users_across_batches(tmp_path):
    """Users whose target ties in timestamp with the previous event, spread over several evaluation batches:
    the untied means are those of the other users, whatever the batching."""
    run = make_run(tmp_path / "run")
    inter = dict(np.load(run / "interactions.npz"))
    timestamps = inter["timestamps"].copy()
    test_pos = inter["offsets"][1:] - 1
    tied_users = np.arange(0, 30, 3)                      # every third user, in every batch of 8
    timestamps[test_pos[tied_users]] = timestamps[test_pos[tied_users] - 1]
    artifacts.save_npz(run / "interactions.npz", **inter | {"timestamps": timestamps})
    report = run_train(run, tmp_path / "out")
    data = train_decoder.load_data(run, run / "rqvae", None, False, 0, 4, 7)
    untied = report["test"]["untied"]
    assert untied["n_users"] == 30 - len(tied_users)
    # The best checkpoint again: everyone in one batch, and the untied users alone in batches of 5.
    gin.clear_config()
    gin.parse_config(TINY_MODEL)
    tiger = train_decoder.ConfiguredTiger(vocab=data.vocab, max_history=4)
    tiger.load_state_dict(torch.load(tmp_path / "out" / "best.pt", weights_only=False)["model"])
    trie = train_decoder.SemanticIdTrie(torch.as_tensor(data.semantic_ids), data.vocab.codebook_sizes)
    runtime = train_decoder.Runtime(device=torch.device("cpu"))
    one_batch = train_decoder.evaluate(tiger, data, trie, data.test_pos, runtime, beam_width=12, top_k=10,
                                       batch_size=64, desc="test")
    gin.clear_config()
    mask = np.ones(30, dtype=bool)
    mask[tied_users] = False
    subset = train_decoder.evaluate(tiger, data, trie, data.test_pos[mask], runtime, beam_width=12, top_k=10,
                                    batch_size=5, desc="test")
    for name in ("recall@10", "ndcg@10", "nll"):
        assert report["test"]["untied"][name] == pytest.approx(one_batch["untied"][name])
        assert one_batch["untied"][name] == pytest.approx(subset[name])
    assert subset["untied"]["n_users"] == 20
