"""Decoder input diagnostics: the perturbations, and agreement with train_decoder's own validation."""
import json
import math

import gin
import numpy as np
import pytest

from experiments import artifacts, decoder_diagnostics
from experiments.decoder_diagnostics import PERTURBATIONS, perturbed_inputs, recall_by_tie, timestamp_ties
from modules.sequences import PAD_TOKEN
from tests.test_train_decoder import make_run, run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_perturbations_change_only_what_they_name():
    n_levels, rows = 2, 4
    src = np.arange(100, 100 + rows * 7).reshape(rows, 7)  # user token + 3 items x 2 codes
    src[0, 1:3] = PAD_TOKEN  # user 0 has 2 items
    out = perturbed_inputs(src, n_levels, seed=1)
    assert list(out) == list(PERTURBATIONS) and np.array_equal(out["as trained"], src)
    tokens, histories = out["another user's token"], out["another user's history"]
    assert np.array_equal(tokens[:, 1:], src[:, 1:]) and np.array_equal(histories[:, 0], src[:, 0])
    # Every row gets another row's token and that same row's history: a permutation with no fixed point.
    donors = [int(np.flatnonzero(src[:, 0] == token)[0]) for token in tokens[:, 0]]
    assert sorted(donors) == list(range(rows)) and all(d != row for row, d in enumerate(donors))
    assert np.array_equal(histories[:, 1:], src[donors, 1:])
    assert (out["no history"][:, 1:] == PAD_TOKEN).all() and np.array_equal(out["no history"][:, 0], src[:, 0])
    shuffled = out["shuffled history"]
    assert np.array_equal(shuffled[:, 0], src[:, 0]) and not np.array_equal(shuffled, src)
    for row in range(rows):  # same items (code pairs kept together), padding in place
        items = lambda x: sorted(map(tuple, x[row, 1:].reshape(-1, n_levels)))
        assert items(shuffled) == items(src)
        assert np.array_equal(shuffled[row, 1:] == PAD_TOKEN, src[row, 1:] == PAD_TOKEN)


def test_as_trained_row_matches_the_runs_validation(tmp_path):
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    report = run_train(run, out)
    found = decoder_diagnostics.main([str(out)])
    as_trained = found["inputs"]["as trained"]
    assert as_trained["nll"] == pytest.approx(report["valid"]["nll"], rel=1e-5)
    assert as_trained["recall@10"] == pytest.approx(report["valid"]["recall@10"])
    assert found["popularity_nll"] == pytest.approx(report["popularity_nll"]["valid"])
    assert set(found["inputs"]) == set(PERTURBATIONS)
    assert found["sasrec_nll"] is None and "sasrec" not in found["ties"]  # the tiny run has no baselines
    share, by_tie = found["ties"]["share"], found["ties"]["tiger"]
    recombined = share * (by_tie["tie"] or 0.0) + (1 - share) * (by_tie["other"] or 0.0)
    assert recombined == pytest.approx(as_trained["recall@10"])  # the two groups partition the users
    assert json.loads((out / "diagnostics_valid.json").read_text()) == json.loads(json.dumps(found))
    assert "| no history |" in (out / "diagnostics_valid.md").read_text()


def test_config_of_an_older_version_takes_current_defaults(tmp_path):
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    report = run_train(run, out)
    config = out / "config.gin"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "max_targets_per_user" not in line))  # as written before the option existed
    assert decoder_diagnostics.main([str(out)])["inputs"]["as trained"]["nll"] == pytest.approx(report["valid"]["nll"])


def test_recall_by_tie_known_answer():
    timestamps = np.array([5, 5, 7, 9, 9, 9])
    ties = timestamp_ties(timestamps, np.array([1, 2, 4, 5]))
    assert ties.tolist() == [True, False, True, True]
    ranked = np.array([[3, 4], [8, 9], [1, 2], [0, 6]])
    assert recall_by_tie(ranked, np.array([4, 9, 7, 7]), ties) == {"tie": pytest.approx(1 / 3), "other": 1.0}
    assert recall_by_tie(ranked, np.array([4, 9, 7, 7]), np.zeros(4, bool))["tie"] is None


def test_swapping_users_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        perturbed_inputs(np.zeros((1, 5), dtype=np.int64), n_levels=2)


def test_ids_rewritten_since_training_are_refused(tmp_path):
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    run_train(run, out)
    path = run / "rqvae" / "semantic_ids.npy"
    ids = np.load(path)
    ids[[0, 1]] = ids[[1, 0]]  # two items swap IDs: same shape, different table
    np.save(path, ids)
    with pytest.raises(artifacts.ArtifactError, match="semantic_ids_sha1"):
        decoder_diagnostics.main([str(out)])


def test_missing_checkpoint_is_named(tmp_path):
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    run_train(run, out)
    (out / "best.pt").unlink()
    with pytest.raises(artifacts.ArtifactError, match="best.pt is missing"):
        decoder_diagnostics.main([str(out)])


def test_with_a_sasrec_the_report_compares_ndcg_on_the_same_users(tmp_path):
    from experiments import baselines
    from tests.test_baselines import TINY_MODEL, TINY_TRAIN
    run, out = make_run(tmp_path / "run"), tmp_path / "out"
    tiger = run_train(run, out)
    sasrec = baselines.train_sasrec(run, run / "baselines" / "sasrec", **TINY_TRAIN, model_config=TINY_MODEL)
    report = decoder_diagnostics.main([str(out), "--split", "test"])
    versus = report["ndcg10_vs_sasrec"]
    # Both sides are each model's own test ndcg@10, so the ratio is theirs; the interval holds it.
    assert versus["tiger"] == pytest.approx(tiger["test"]["ndcg@10"])
    assert versus["sasrec"] == pytest.approx(sasrec["test"]["ndcg@10"])
    assert versus["ratio"] == pytest.approx(versus["tiger"] / versus["sasrec"])
    assert versus["ci95"][0] <= versus["ratio"] <= versus["ci95"][1] and versus["n_resamples"] == 10_000
    assert 0.0 <= versus["share_at_least_0.8"] <= 1.0
    # Standard errors of the two per-user ndcg@10 means (paired_summary's known answers: tests/test_metrics.py):
    # a per-user ndcg in [0, 1] with mean m has a standard error of at most sqrt(m (1 - m) / (U - 1)).
    for model in ("tiger", "sasrec"):
        mean, se = versus[model], versus["standard_error"][model]
        assert (se > 0) == (mean > 0) and se <= math.sqrt(mean * (1 - mean) / (report["n_users"] - 1)) + 1e-12
    assert -1.0 <= versus["per_user_correlation"] <= 1.0
    text = (out / "diagnostics_test.md").read_text()
    assert "paired bootstrap" in text and "standard error" in text


def test_exact_ranking_matches_a_beam_that_covers_the_catalogue(tmp_path):
    run, out = make_run(tmp_path / "run", n_items=40), tmp_path / "out"
    run_train(run, out)
    # A beam as wide as the 40-item catalogue keeps every item: its top 10 is the exact raw ranking's.
    found = decoder_diagnostics.main([str(out), "--beam-width", "40", "--exact"])
    exact = found["exact_ranking"]
    assert list(exact) == ["raw", "renormalised"]
    assert exact["raw"]["recall@10"] == pytest.approx(found["inputs"]["as trained"]["recall@10"])
    assert exact["raw"]["ndcg@10"] == pytest.approx(found["inputs"]["as trained"]["ndcg@10"])
    assert all(0.0 <= m["ndcg@10"] <= m["recall@10"] <= 1.0 for m in exact.values())
    assert "| renormalised |" in (out / "diagnostics_valid.md").read_text()
    assert "exact_ranking" not in decoder_diagnostics.main([str(out)])  # only when asked


def test_exact_scores_renormalised_is_the_trie_constrained_likelihood(tmp_path):
    import torch
    from modules.beam_search import SemanticIdTrie, item_log_likelihood
    run, out = make_run(tmp_path / "run", n_items=40), tmp_path / "out"
    run_train(run, out)
    model, data, _ = decoder_diagnostics.load_trained(out)
    gin.clear_config()  # load_trained leaves the run's config parsed
    positions = data.valid_pos[:6]
    src, semantic_ids = torch.as_tensor(data.encoder_inputs(positions)), torch.as_tensor(data.semantic_ids)
    trie = SemanticIdTrie(semantic_ids, data.vocab.codebook_sizes)
    with torch.no_grad():
        scores = decoder_diagnostics.exact_scores(model, src, semantic_ids, trie)
        target_ll = item_log_likelihood(model, src, torch.as_tensor(data.target_codes(positions)), trie)
    targets = torch.as_tensor(data.interactions.item_index[positions]).long()
    # A distribution over the catalogue for every input, whose value at the target is item_log_likelihood's;
    # the raw sum (a softmax over whole code slices, which also covers IDs that do not exist) stays below it.
    assert torch.allclose(scores["renormalised"].exp().sum(1), torch.ones(len(positions)), atol=1e-5)
    assert torch.allclose(scores["renormalised"].gather(1, targets[:, None]).squeeze(1), target_ll, atol=1e-5)
    assert (scores["raw"] <= scores["renormalised"] + 1e-5).all()
