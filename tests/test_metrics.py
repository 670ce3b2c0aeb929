"""Known-answer tests for modules.metrics (hand-computed recall / NDCG, seen-item exclusion)."""
import math

import numpy as np
import pytest
import torch

from modules.metrics import (paired_bootstrap_ratio, paired_summary, ranking_metrics, seen_mask, target_ranks,
                            topk_unseen)


def test_ranking_metrics_known_answer():
    # user 0: target at rank 0; user 1: rank 3; user 2: rank 7; user 3: absent.
    ranked = np.array([
        [4, 1, 2, 3, 5, 6, 7, 8, 9, 10],
        [0, 1, 2, 9, 5, 6, 7, 8, 3, 10],
        [0, 1, 2, 3, 4, 5, 6, 11, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    ])
    targets = np.array([4, 9, 11, 42])
    m = ranking_metrics(ranked, targets)
    assert list(m) == ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(5)) / 4)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)


def test_ranking_metrics_accepts_tensors_and_custom_ks():
    ranked = torch.tensor([[3, 2, 1], [1, 2, 3]])
    targets = torch.tensor([2, 3])
    m = ranking_metrics(ranked, targets, ks=(1, 3))
    assert m == pytest.approx({"recall@1": 0.0, "recall@3": 1.0, "ndcg@1": 0.0,
                               "ndcg@3": (1 / math.log2(3) + 1 / math.log2(4)) / 2})


def test_minus_one_padding_never_matches_and_duplicates_count_once():
    ranked = np.array([[-1, -1, 5, -1, -1], [7, 7, 2, -1, -1]])
    assert target_ranks(ranked, np.array([5, 2])).tolist() == [2, 2]
    # A duplicated target: its first position counts, not a sum over both.
    assert target_ranks(np.array([[1, 3, 3]]), np.array([3])).tolist() == [1]
    m = ranking_metrics(np.array([[1, 3, 3, -1, -1]]), np.array([3]), ks=(5,))
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("ranked, targets, match", [
    (np.zeros((2, 4), dtype=int), np.array([0, 1]), "largest cutoff"),
    (np.zeros((2, 10), dtype=int), np.array([0]), "matching"),
    (np.zeros((2, 10), dtype=int), np.array([0, -1]), ">= 0"),
    (np.zeros((0, 10), dtype=int), np.zeros(0, dtype=int), "zero users"),
    (np.zeros((1, 10)), np.array([0]), "integer"),
])
def test_ranking_metrics_rejects_bad_input(ranked, targets, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(ranked, targets)


def test_topk_unseen_excludes_history_list_and_csr_agree():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.1, 0.2, 0.3, 0.4, 0.5]])
    as_list = topk_unseen(scores, [np.array([0, 2]), np.array([4])], k=2)
    assert as_list.tolist() == [[1, 3], [3, 2]]
    as_csr = topk_unseen(scores, (np.array([0, 2, 3]), np.array([0, 2, 4])), k=2)
    assert torch.equal(as_list, as_csr)
    # CSR offsets that do not start at 0 (a slice of a bigger event array).
    sliced = topk_unseen(scores, (np.array([10, 12, 13]), np.r_[np.zeros(10, int), [0, 2, 4]]), k=2)
    assert torch.equal(as_list, sliced)


def test_topk_unseen_ties_break_by_lower_item_row():
    scores = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0, 1.0, 2.0]])
    ranked = topk_unseen(scores, [np.array([2])], k=5)
    assert ranked.tolist() == [[1, 4, 6, 0, 3]]


def test_topk_unseen_pads_with_minus_one_when_too_few_unseen_items():
    scores = torch.tensor([[0.0, float("-inf"), 2.0, 1.0]])
    ranked = topk_unseen(scores, [np.array([2, 0])], k=6)
    # item 1 has the model's own -inf but is unseen, so it still ranks before the padding.
    assert ranked.tolist() == [[3, 1, -1, -1, -1, -1]]
    m = ranking_metrics(ranked, np.array([1]), ks=(1, 5))
    assert m["recall@1"] == 0.0 and m["recall@5"] == 1.0


def test_topk_unseen_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (20, 30), generator=gen).float()  # many ties on purpose
    rng = np.random.default_rng(0)
    histories = [rng.choice(30, size=rng.integers(0, 30), replace=False) for _ in range(20)]
    ranked = topk_unseen(scores, histories, k=10).numpy()
    for u, history in enumerate(histories):
        unseen = [i for i in range(30) if i not in set(history.tolist())]
        expected = sorted(unseen, key=lambda i: (-scores[u, i].item(), i))[:10]
        expected += [-1] * (10 - len(expected))
        assert ranked[u].tolist() == expected


def test_seen_mask_and_input_errors():
    mask = seen_mask([np.array([1]), np.array([], dtype=np.int64)], n_users=2, n_items=3)
    assert mask.tolist() == [[False, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="outside 0..2"):
        seen_mask([np.array([3])], n_users=1, n_items=3)
    with pytest.raises(ValueError, match="use a list"):
        topk_unseen(torch.zeros(2, 3), (np.array([0]), np.array([1])), k=1)
    with pytest.raises(ValueError, match="NaN"):
        topk_unseen(torch.tensor([[float("nan"), 0.0]]), [np.array([], dtype=np.int64)], k=1)


def test_untied_metrics_are_the_metrics_of_the_untied_users_only():
    from modules.metrics import with_untied
    ranked = np.array([[3, 1, 2, -1, -1, -1, -1, -1, -1, -1]] * 4)
    targets = np.array([3, 1, 7, 2])            # ranks 0, 1, absent, 2
    result = with_untied(ranked, targets, np.array([False, True, True, False]))
    assert result["recall@10"] == 0.75
    assert result["untied"] == {"recall@5": 0.5, "recall@10": 0.5, "ndcg@5": 0.5 / np.log2(3),
                                "ndcg@10": 0.5 / np.log2(3), "n_users": 2}
    none = with_untied(ranked, targets, np.zeros(4, dtype=bool))["untied"]
    assert none["n_users"] == 0 and np.isnan(none["recall@10"])


def test_paired_bootstrap_ratio_known_answers_and_errors():
    rng = np.random.default_rng(0)
    b = (rng.random(300) < 0.3) * rng.random(300)
    # A model at exactly half the reference on every user: every paired resample gives 0.5.
    ratio, resampled = paired_bootstrap_ratio(0.5 * b, b, n_resamples=500)
    assert ratio == pytest.approx(0.5) and np.allclose(resampled[np.isfinite(resampled)], 0.5)
    # Independent models: the interval holds the point estimate, pairing narrows it, the seed fixes it.
    a = (rng.random(300) < 0.3) * rng.random(300)
    ratio, resampled = paired_bootstrap_ratio(a, b, n_resamples=2000, seed=3)
    low, high = np.percentile(resampled, [2.5, 97.5])
    assert low < ratio < high and high - low > 0.1
    assert np.array_equal(resampled, paired_bootstrap_ratio(a, b, n_resamples=2000, seed=3)[1])
    correlated = 0.8 * b + 0.2 * a
    c_low, c_high = np.percentile(paired_bootstrap_ratio(correlated, b, n_resamples=2000)[1], [2.5, 97.5])
    assert c_high - c_low < (high - low) / 2
    # Chunked drawing covers every resample (more resamples than one chunk holds at this user count).
    many = paired_bootstrap_ratio(np.ones(2 ** 13), np.full(2 ** 13, 2.0), n_resamples=1100)[1]
    assert len(many) == 1100 and np.allclose(many, 0.5)
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap_ratio(a, b[:-1])
    with pytest.raises(ValueError, match="mean is 0"):
        paired_bootstrap_ratio(a, np.zeros(300))


def test_paired_summary_known_answers_and_errors():
    # Orthogonal patterns: equal means, standard error std(ddof=1) / sqrt(4) = sqrt(1/3) / 2, correlation 0.
    out = paired_summary(np.array([0.0, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0, 0.0]))
    assert out["mean"] == (0.5, 0.5)
    assert out["standard_error"] == pytest.approx((math.sqrt(1 / 3) / 2,) * 2)
    assert out["correlation"] == pytest.approx(0.0, abs=1e-12)
    # A rescaled copy correlates at 1 and its standard error scales with it; a mirrored one at -1.
    b = np.array([0.1, 0.0, 0.4, 0.3, 0.0])
    same = paired_summary(2 * b, b)
    assert same["correlation"] == pytest.approx(1.0)
    assert same["standard_error"][0] == pytest.approx(2 * same["standard_error"][1])
    assert paired_summary(-b, b)["correlation"] == pytest.approx(-1.0)
    # A model that gives every user the same value: the correlation is undefined, said as NaN.
    assert math.isnan(paired_summary(np.zeros(5), b)["correlation"])
    assert math.isnan(paired_summary(np.full(7, 0.1), np.arange(7.0))["correlation"])  # std rounds to ~1e-17
    with pytest.raises(ValueError, match="same users"):
        paired_summary(b, b[:-1])
    with pytest.raises(ValueError, match="U >= 2"):
        paired_summary(b[:1], b[:1])
