"""Cold start: the split (nothing a model trains on carries a cold item), the epsilon rule, the rankers."""
import json

import numpy as np
import pytest
import torch

from experiments import artifacts
from experiments.cold_start import (EPSILONS, TOP, Examples, cold_order, epsilon_metrics, knn_scorer, run_cold_start,
                                    score_ranker)
from experiments.baselines import write_run_report
from experiments.ml25m import HeldOut, tags_block
from experiments.movielens import hold_out_cold, prepare_interactions, save_cold_split
from modules.beam_search import (SemanticIdTrie, beam_search, exhaustive_item_scores, item_log_likelihood,
                                 renormalise_over_trie)
from modules.cold_start import (NO_ITEM, choose_cold_items, cold_labels, cold_slots,
                                recent_mean, reserve_cold, reserved_metrics, split_cold, top_in_group, unit_rows)
from modules.popularity import item_popularity
from modules.split import leave_one_out
from modules.tiger import Tiger
from modules.sequences import Vocabulary
from tests.test_train_decoder import make_run, run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cold_slots_round_half_up():
    assert [cold_slots(10, e) for e in (0.0, 0.1, 0.25, 0.5, 1.0)] == [0, 1, 3, 5, 10]
    assert cold_slots(5, 0.1) == 1   # 0.5 rounds up: Python's round() would give 0 cold slots at K=5
    with pytest.raises(ValueError, match="epsilon"):
        cold_slots(10, 1.5)


def test_choose_cold_items_is_seeded_disjoint_and_inside_the_rated_items():
    rated = np.arange(3, 203, 2)   # 100 rated rows
    valid, test = choose_cold_items(rated, 0.1, seed=4)
    assert (len(valid), len(test)) == (5, 5) and not np.intersect1d(valid, test).size
    assert np.isin(np.r_[valid, test], rated).all()
    again = choose_cold_items(rated, 0.1, seed=4)
    assert np.array_equal(again[0], valid) and np.array_equal(again[1], test)
    assert not np.array_equal(np.r_[choose_cold_items(rated, 0.1, seed=5)], np.r_[valid, test])
    with pytest.raises(ValueError, match="fraction"):
        choose_cold_items(rated, 1.0, 0)


def test_split_cold_known_answer():
    # user 0: a b C a2 D ; user 1: C x y z ; user 2: a D b  (C = valid-cold item 5, D = test-cold item 6)
    offsets = np.array([0, 5, 9, 12])
    item_index = np.array([0, 1, 5, 2, 6, 5, 3, 4, 0, 0, 6, 1])
    labels = cold_labels(7, [5], [6])
    split = split_cold(offsets, item_index, labels)
    # user 2 keeps 2 warm events (< 3): dropped with its events
    assert split.kept_users.tolist() == [True, True, False]
    assert item_index[split.keep].tolist() == [0, 1, 2, 3, 4, 0]
    assert split.offsets.tolist() == [0, 3, 6]
    assert split.n_cold_events == 4
    # user 0's first valid-cold event has 2 warm events before it; user 1's has none (no example)
    assert (split.valid.user_row.tolist(), split.valid.end.tolist(), split.valid.target.tolist()) == ([0], [2], [5])
    # user 0's test-cold event: 3 warm events before it (the valid-cold item is not in the input)
    assert (split.test.user_row.tolist(), split.test.end.tolist(), split.test.target.tolist()) == ([0], [3], [6])
    assert split.test.timestamp is None                       # no times given, none recorded


def test_cold_examples_record_the_cold_events_time_and_flag_same_second_inputs():
    # user 0: a b C a2 D at seconds 10 20 20 30 30: C ties with b (its last input), D ties with a2
    # user 1: x y z E (E = a second valid-cold item) at 1 2 3 4: untied
    offsets = np.array([0, 5, 9])
    item_index = np.array([0, 1, 5, 2, 6, 3, 4, 0, 7])
    times = np.array([10, 20, 20, 30, 30, 1, 2, 3, 4])
    split = split_cold(offsets, item_index, cold_labels(8, [5, 7], [6]), timestamps=times)
    assert split.valid.target.tolist() == [5, 7] and split.valid.timestamp.tolist() == [20, 4]
    assert split.test.timestamp.tolist() == [30]
    warm_times = times[split.keep]
    inter = artifacts.Interactions(np.array([0, 1]), split.offsets, item_index[split.keep], warm_times,
                                   np.ones(split.keep.sum(), np.float32))
    cold = artifacts.ColdSet(np.array([5, 7]), np.array([6]), {"valid": split.valid, "test": split.test})
    from experiments.cold_start import cold_examples
    assert cold_examples(inter, cold, "valid").untied.tolist() == [False, True]
    assert cold_examples(inter, cold, "test").untied.tolist() == [False]


def test_prepared_cold_items_reach_no_training_input_count_or_feature(tiny_demo_data, tmp_path):
    """Plant cold items with prepare --cold: no event, popularity count or tag feature carries them, and they
    stay in the catalogue."""
    run = tmp_path / "run"
    stats = prepare_interactions(tiny_demo_data, run, cold_fraction=0.2, cold_seed=1)
    cold = artifacts.load_cold(run)
    inter = artifacts.load_interactions(run)
    item_ids = artifacts.load_item_ids(run)
    assert stats["cold"]["n_cold_items"] == len(cold.items) > 2 and stats["items"] == len(item_ids)
    assert np.array_equal(np.load(run / "cold_items.npy"), item_ids[cold.items])
    assert not np.isin(inter.item_index, cold.items).any()                       # no training/eval event
    counts = item_popularity(inter.item_index, leave_one_out(inter.offsets), len(item_ids))
    assert (counts[cold.items] == 0).all()                                       # no popularity
    for half, examples in cold.examples.items():
        assert len(examples) > 0
        assert np.isin(examples.target, cold.valid_items if half == "valid" else cold.test_items).all()
        for row, end in zip(examples.user_row, examples.end):                   # inputs are warm and non-empty
            history = inter.item_index[inter.offsets[row]:end]
            assert len(history) >= 1 and not np.isin(history, cold.items).any()
    # tags.csv has tags on cold movies; the tag block keeps none of them
    tags = np.loadtxt(tiny_demo_data / "tags.csv", delimiter=",", skiprows=1, usecols=1, dtype=np.int64)
    assert np.isin(tags, item_ids[cold.items]).any()
    block = tags_block(tiny_demo_data, item_ids, vocabulary_size=64, min_movies_per_tag=1,
                       held_out=HeldOut.of_run(run, item_ids))
    assert not block.mask[cold.items].any() and (block.values[cold.items] == 0).all()
    # the tag genome is user activity too: the cold movies' rows are masked
    from experiments.ml25m import genome_block
    genome = genome_block(tiny_demo_data, item_ids, np.load(run / "cold_items.npy"))
    assert genome.mask.sum() > 0 and not genome.mask[cold.items].any() and (genome.values[cold.items] == 0).all()
    # a rerun with the same settings reuses; another fraction is refused; no cold split removes the files
    assert prepare_interactions(tiny_demo_data, run, cold_fraction=0.2, cold_seed=1) == stats
    with pytest.raises(FileExistsError, match="cold_fraction"):
        prepare_interactions(tiny_demo_data, run, cold_fraction=0.1, cold_seed=1)
    prepare_interactions(tiny_demo_data, run, overwrite=True)
    assert artifacts.load_cold(run) is None and not (run / "cold_items.npy").exists()


def test_an_older_stats_json_without_cold_settings_still_matches(tiny_demo_data, tmp_path):
    run = tmp_path / "run"
    stats = prepare_interactions(tiny_demo_data, run)
    record = json.loads((run / "stats.json").read_text())
    for key in ("cold_fraction", "cold_seed"):
        del record["config"][key]
    (run / "stats.json").write_text(json.dumps(record))
    assert prepare_interactions(tiny_demo_data, run)["interactions"] == stats["interactions"]


def test_reserve_cold_and_its_metrics_known_answer():
    warm = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    cold = np.array([[100, 101, 102, NO_ITEM, NO_ITEM, NO_ITEM, NO_ITEM, NO_ITEM, NO_ITEM, NO_ITEM]])
    assert reserve_cold(warm, cold, 5, 0.2).tolist() == [[1, 2, 3, 4, 100]]
    assert reserve_cold(warm, cold, 10, 0.2).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 100, 101]]
    found = reserved_metrics(warm, cold, np.array([101]), 0.2)
    assert found["recall@5"][0] == 0 and found["recall@10"][0] == 1
    assert found["ndcg@10"][0] == pytest.approx(1 / np.log2(9 + 2))
    # epsilon 0: the warm list alone; a warm target at rank 9 is lost to a cold slot at epsilon 0.2
    assert reserved_metrics(warm, cold, np.array([9]), 0.0)["recall@10"][0] == 1
    assert reserved_metrics(warm, cold, np.array([9]), 0.2)["recall@10"][0] == 0


def test_epsilon_metrics_pool_warm_and_cold_examples():
    warm_rank = np.tile(np.arange(10), (3, 1))          # 3 warm examples, targets at ranks 0, 5, 9
    cold_rank = np.tile(np.arange(100, 110), (2, 1))    # 2 cold examples, targets at cold ranks 0, 3
    at = epsilon_metrics(warm_rank, np.array([0, 5, 9]), cold_rank, np.array([100, 103]), 0.3)
    assert at["warm"]["recall@10"] == pytest.approx(2 / 3)      # 7 warm slots: rank 9 is out
    assert at["cold"]["recall@10"] == pytest.approx(1 / 2)      # 3 cold slots: cold rank 3 is out
    assert at["all"]["recall@10"] == pytest.approx(3 / 5)
    assert at["cold"]["ndcg@10"] == pytest.approx(0.5 / np.log2(7 + 2))


def test_top_in_group_breaks_ties_by_row_and_pads():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1]])
    allowed = torch.tensor([[True, False, True, True]])
    assert top_in_group(scores, allowed, 5).tolist() == [[0, 2, 3, NO_ITEM, NO_ITEM]]


def test_unit_rows_and_recent_mean_known_answer():
    unit = unit_rows(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
    assert torch.allclose(unit.norm(dim=1), torch.ones(4))
    query = recent_mean(unit, [np.array([3, 0, 2])], n_recent=2)   # last two: items 0 and 2
    assert torch.allclose(query, ((unit[0] + unit[2]) / 2)[None])
    with pytest.raises(ValueError, match="catalogue mean"):
        unit_rows(np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]))


def test_semantic_knn_ranks_the_cold_item_of_the_users_cluster_first(tmp_path):
    """Two feature clusters; a history in cluster A ranks A's cold item above B's; seen items excluded."""
    features = np.array([[1, 0], [1.1, 0], [0.9, 0.1], [0, 1], [0.1, 1.2], [0, 0.9]], dtype=np.float32)
    is_cold = torch.tensor([False, False, True, False, False, True])
    inter = artifacts.Interactions(np.array([1, 2]), np.array([0, 2, 4]), np.array([0, 1, 3, 4], np.int32),
                                   np.arange(4), np.ones(4, np.float32))
    ranker = score_ranker(knn_scorer(features, inter), inter, is_cold, choices=(1, 2))
    examples = Examples(np.array([0, 1]), np.array([0, 2]), np.array([2, 4]), np.array([2, 5]))
    ranked = ranker.rank(examples, ("cold", "warm"), (2,))
    assert ranked["cold"][2][:, 0].tolist() == [2, 5] and ranked["cold"][2][:, 2].tolist() == [NO_ITEM, NO_ITEM]
    assert not np.isin(ranked["warm"][2][0], [0, 1, 2, 5]).any()   # warm group: unseen warm items only


def test_prefix_scores_and_cold_order_equal_exhaustive_scoring():
    """A beam as wide as the cold catalogue scores every cold item exactly, level by level."""
    torch.manual_seed(0)
    sizes = (3, 4, 2)
    codes = torch.tensor([[a, b, c] for a in range(3) for b in range(4) for c in range(2)][:20])
    vocab = Vocabulary(sizes, 5)
    model = Tiger(vocab=vocab, max_history=3, embed_dim=16, attn_dim=16, n_heads=2, mlp_dim=32, n_layers=2).eval()
    src = torch.randint(2, 2 + vocab.n_code_tokens, (4, 1 + 3 * 3))
    members = np.array([1, 4, 6, 9, 13, 17, 19])
    trie = SemanticIdTrie(codes[members], sizes)
    result = beam_search(model, src, trie, len(members), len(members))
    assert torch.allclose(result.prefix_scores[:, :, -1], result.scores)
    exhaustive = exhaustive_item_scores(model, src, codes[members])
    found = result.scores.gather(1, torch.sort(result.items, dim=1).indices)
    assert torch.allclose(found, exhaustive, atol=1e-5)
    ranked = cold_order(model, src, trie, members, ((1, "joint"), (3, "joint"), (3, "constrained")))
    expected_full = members[np.argsort(-exhaustive.numpy(), axis=1, kind="stable")]
    assert np.array_equal(ranked[(3, "joint")][:, :7], expected_full)
    # constrained: the trie-renormalised likelihood of every cold item, as item_log_likelihood computes it
    constrained = torch.stack([item_log_likelihood(model, src, codes[members][i].expand(4, -1), trie)
                               for i in range(len(members))], 1)
    assert torch.allclose(constrained.exp().sum(1), torch.ones(4), atol=1e-5)
    expected = members[np.argsort(-constrained.numpy(), axis=1, kind="stable")]
    assert np.array_equal(ranked[(3, "constrained")][:, :7], expected)
    # depth 1: the first code's log-probability decides; every item under the best first code comes first
    first = model.next_level_log_probs(*model.encode(src), torch.zeros(4, 0, dtype=torch.int64))
    best = first.argmax(1).numpy()
    n_best = [(codes[members][:, 0].numpy() == b).sum() for b in best]
    for row in range(4):
        assert (codes[ranked[(1, "joint")][row, :n_best[row]], 0].numpy() == best[row]).all()


def test_cold_order_pads_when_there_are_fewer_cold_items_than_the_list():
    torch.manual_seed(0)
    sizes = (3, 2)
    codes = torch.tensor([[a, b] for a in range(3) for b in range(2)])
    model = Tiger(vocab=Vocabulary(sizes, 5), max_history=2, embed_dim=16, attn_dim=16, n_heads=2, mlp_dim=32,
                  n_layers=2).eval()
    src = torch.randint(2, 7, (3, 1 + 2 * 2))
    members = np.array([1, 4, 5])
    ranked = cold_order(model, src, SemanticIdTrie(codes[members], sizes), members, ((1, "joint"),))[(1, "joint")]
    assert ranked.shape == (3, TOP)
    assert (np.sort(ranked[:, :3], axis=1) == members).all() and (ranked[:, 3:] == NO_ITEM).all()


def test_random_model_draws_other_scores_for_other_example_sets():
    from experiments.cold_start import Examples, random_scorer
    score = random_scorer(50, seed=0)
    same = np.zeros(4, np.int64)
    warm, cold = (Examples(same, same, same, same, name) for name in ("warm test", "cold test"))
    assert torch.equal(score(warm, slice(0, 4), None), score(warm, slice(0, 4), None))
    assert not torch.equal(score(warm, slice(0, 4), None), score(cold, slice(0, 4), None))


def test_renormalise_over_trie_known_answer():
    # two first codes; under code 0 two children, under code 1 one child
    trie = SemanticIdTrie(torch.tensor([[0, 0], [0, 1], [1, 0]]), (2, 2))
    level = torch.log(torch.tensor([[[0.5, 0.2], [0.5, 0.6], [0.25, 0.9]]]))
    found = renormalise_over_trie(trie, level).exp()
    # level 0: children 0 (0.5) and 1 (0.25) -> 2/3, 1/3; level 1 under 0: 0.2, 0.6 -> 1/4, 3/4; under 1: 1
    assert torch.allclose(found, torch.tensor([[[2 / 3, 0.25], [2 / 3, 0.75], [1 / 3, 1.0]]]))
    with pytest.raises(ValueError, match="do not match"):
        renormalise_over_trie(trie, level[:, :2])


def cold_run(folder, n_items=80, n_users=60):
    """make_run's tiny run (each user walks one first-code group) with a quarter of the items held out cold."""
    run = make_run(folder, n_items=n_items, n_users=n_users)
    inter = artifacts.load_interactions(run)
    cold, warm = hold_out_cold(inter.user_ids, inter.offsets, inter.item_index, inter.timestamps, inter.ratings,
                               n_items, 0.25, 0)
    artifacts.save_npz(run / "interactions.npz", **dict(zip(
        ("user_ids", "offsets", "item_index", "timestamps", "ratings"), warm)))
    save_cold_split(run, artifacts.load_item_ids(run), cold)
    return run


LEARN = "\n".join(["Tiger.causal_encoder = True", "Tiger.embed_dim = 32", "Tiger.attn_dim = 32", "Tiger.mlp_dim = 64",
                   "Tiger.dropout = 0.0", "train_decoder.targets_per_window = 4", "train_decoder.max_history = 6",
                   "train_decoder.iterations = 150", "train_decoder.batch_size = 32",
                   "train_decoder.learning_rate = 0.005", "train_decoder.warmup_steps = 10",
                   "train_decoder.eval_every = 150", "train_decoder.eval_batch_size = 64"])


def test_tiger_reaches_cold_items_by_their_code_prefix_and_the_report_holds_the_cold_section(tmp_path):
    """Users stay inside one first-code group, so a decoder trained on warm items alone can rank the cold items
    of the right group first: at epsilon 0.5 (5 cold slots, 5 cold items per group) far above random."""
    run = cold_run(tmp_path / "run")
    cold = artifacts.load_cold(run)
    trained = run_train(run, run / "decoder", LEARN)
    report = run_cold_start(run, models=["tiger", "popularity", "random"], epsilon=0.5,
                            beam_width=trained["beam_width"])
    tiger, random = report["models"]["tiger"], report["models"]["random"]
    assert report["n_cold_examples"] == len(cold.examples["test"]) and report["cold_slots"] == {"5": 3, "10": 5}
    # the untied subset: the examples whose last input event is strictly earlier than the cold event
    inter = artifacts.load_interactions(run)
    test = cold.examples["test"]
    untied = inter.timestamps[test.end - 1] < test.timestamp
    assert report["n_untied_cold_examples"] == tiger["untied"]["n_examples"] == int(untied.sum()) > 0
    assert 0.0 <= tiger["untied"]["recall@10"] <= 1.0
    assert tiger["recall@10"] >= 0.8 and random["recall@10"] <= 0.5, (tiger, random)
    assert tiger["cold_only"]["recall@10"] == 1.0      # 20 cold items, 10 slots: the 5 of the group are in
    depth, scoring = report["settings"]["tiger"]["prefix_depth, scoring"]
    assert depth in (1, 2, 3) and scoring in ("joint", "constrained")
    # the natural ranking of the warm test users is train_decoder's own test evaluation
    assert tiger["natural"]["warm"]["recall@10"] == pytest.approx(trained["test"]["recall@10"])
    assert tiger["natural"]["warm"]["ndcg@10"] == pytest.approx(trained["test"]["ndcg@10"])
    assert report["models"]["popularity"]["natural"]["cold_share_of_top10"] == 0.0  # cold items rank below warm ones
    assert set(report["sweep"]["tiger"]) == {str(e) for e in EPSILONS}
    assert report["sweep"]["tiger"]["0.0"]["cold"]["recall@10"] == 0.0      # no cold slot, no cold hit
    assert (run / "cold" / "cold_epsilon.png").stat().st_size > 0
    # reused for the same inputs, refused for another epsilon
    assert run_cold_start(run, models=["tiger", "popularity", "random"], epsilon=0.5,
                          beam_width=trained["beam_width"]) == report
    with pytest.raises(artifacts.StaleOutputError, match="epsilon"):
        run_cold_start(run, models=["tiger", "popularity", "random"], epsilon=0.1, beam_width=trained["beam_width"])
    # the run report carries the cold section
    merged = write_run_report(run, ["decoder"])
    assert merged["cold"]["models"]["tiger"]["recall@10"] == tiger["recall@10"]
    assert "## Cold start" in (run / "results.md").read_text()
    # a decoder retrained since (another best.pt) leaves the cold section stale: the report refuses it
    best = run / "decoder" / "best.pt"
    best.write_bytes(best.read_bytes() + b"retrained")
    with pytest.raises(artifacts.ArtifactError, match="best.pt"):
        write_run_report(run, ["decoder"], overwrite=True)


def test_a_decoder_from_another_run_is_refused(tmp_path):
    """A model trained on the same data without the cold split has seen the cold items: never evaluated."""
    other = make_run(tmp_path / "other", n_items=80, n_users=60)
    run_train(other, other / "decoder")
    run = cold_run(tmp_path / "run")
    with pytest.raises(artifacts.ArtifactError, match="another run"):
        run_cold_start(run, decoder=other / "decoder", models=["tiger"])


def test_cold_start_needs_a_cold_split(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(artifacts.ArtifactError, match="--cold"):
        run_cold_start(run, models=["random"])


def fake_cold_report(seed_value: float) -> dict:
    metrics = {name: seed_value for name in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")}
    entry = {**metrics, "warm": dict(metrics), "all": dict(metrics), "cold_only": dict(metrics),
             "natural": {"cold": dict(metrics)}, "item_mean": {"cold_only": dict(metrics)}}
    sweep = {str(e): {"cold": dict(metrics), "warm": dict(metrics), "all": dict(metrics)} for e in EPSILONS}
    return {"epsilon": 0.1, "n_cold_items": 8, "n_cold_examples": 5, "models": {"tiger": entry, "semantic_knn": entry},
            "sweep": {"tiger": sweep, "semantic_knn": sweep}}


def test_cold_summaries_over_seeds_known_answer():
    from experiments.ablation import cold_markdown_table, cold_summary
    from experiments.seeds import cold_markdown, summarise_cold
    reports = {0: fake_cold_report(0.1), 1: fake_cold_report(0.3)}
    over_seeds = summarise_cold(reports)
    assert over_seeds["models"]["tiger"]["recall@10"]["mean"] == pytest.approx(0.2)
    assert over_seeds["models"]["tiger"]["recall@10"]["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert "| tiger | 0.2000 ± 0.1414" in cold_markdown(over_seeds)
    by_set = cold_summary({s: {"cold": r} for s, r in reports.items()})
    assert by_set["models"]["semantic_knn"]["mean"]["ndcg@10"] == pytest.approx(0.2)
    assert by_set["models"]["tiger"]["valid_sweep_recall@10"]["0.5"]["mean"] == pytest.approx(0.2)
    table = cold_markdown_table({"all": {"label": "all", "cold": by_set}})
    assert "| all | tiger | 0.2000 ± 0.1414 |" in table and table.rstrip().endswith("0.2000 ± 0.1414 |")
    assert over_seeds["models"]["tiger"]["item-mean cold-only recall@10"]["mean"] == pytest.approx(0.2)


def test_item_mean_metrics_weigh_every_target_movie_once():
    from experiments.cold_start import item_mean_metrics
    # movie 7 is the target of three examples, all hit at rank 1; movie 9 of one example, missed
    ranked = np.full((4, TOP), NO_ITEM, dtype=np.int64)
    ranked[:3, 0] = 7
    ranked[3, 0] = 8
    found = item_mean_metrics(ranked, np.array([7, 7, 7, 9]), epsilon=0.1)
    assert found["n_items"] == 2
    assert found["cold_only"]["recall@10"] == pytest.approx(0.5)          # per example it would be 0.75
    assert found["epsilon"]["recall@10"] == pytest.approx(0.5)            # the one slot holds rank 1


def test_target_concentration_known_answer():
    from experiments.cold_start import target_concentration
    found = target_concentration(np.array([7, 7, 7, 3, 5, 5, 9, 1, 2, 4, 6, 8]))
    assert found == {"distinct": 9, "top1_share": 3 / 12, "top10_share": 1.0}
