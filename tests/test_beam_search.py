"""Constrained beam search: exactness against exhaustive scoring, validity, seen-item exclusion."""
import numpy as np
import pytest
import torch

from modules.beam_search import NO_ITEM, SemanticIdTrie, beam_search, exhaustive_item_scores, item_log_likelihood
from modules.sequences import Vocabulary, random_semantic_ids
from modules.tiger import Tiger

CODEBOOK_SIZES = (4, 3, 2)  # 24 possible IDs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_setup(n_items=15, n_users=6, seed=0):
    """A random tiny Tiger, random unique semantic IDs and random encoder inputs."""
    torch.manual_seed(seed)
    vocab = Vocabulary(CODEBOOK_SIZES, n_user_buckets=5)
    model = Tiger(vocab, max_history=3, embed_dim=16, attn_dim=16, n_heads=2, mlp_dim=32, n_layers=2).eval()
    semantic_ids = torch.as_tensor(random_semantic_ids(n_items, CODEBOOK_SIZES, seed=seed))
    src = torch.randint(2, vocab.size, (n_users, model.src_length))
    src[:, 1:4] = 0  # some padding
    return model, semantic_ids, src


@pytest.mark.parametrize("with_seen", [False, True])
def test_catalogue_wide_beam_equals_exhaustive_ranking(with_seen):
    model, semantic_ids, src = tiny_setup()
    n_items = len(semantic_ids)
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES)
    seen = torch.zeros(len(src), n_items, dtype=torch.bool)
    if with_seen:
        seen[torch.arange(len(src)), torch.arange(len(src))] = True
        seen[0, 7:12] = True
    top_k = n_items - 6  # every user has at least top_k unseen items
    result = beam_search(model, src, trie, beam_width=n_items, top_k=top_k, seen=seen if with_seen else None)

    scores = exhaustive_item_scores(model, src, semantic_ids).masked_fill(seen, float("-inf"))
    expected_scores, expected_items = scores.sort(dim=1, descending=True)
    assert torch.equal(result.items, expected_items[:, :top_k])
    torch.testing.assert_close(result.scores, expected_scores[:, :top_k], rtol=1e-5, atol=1e-5)
    assert not seen.gather(1, result.items).any()


def test_item_log_likelihood_is_a_distribution_over_the_catalogue():
    model, semantic_ids, src = tiny_setup(n_items=11)  # 11 of 24 possible IDs: some children are missing
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES)
    n_users, n_items = len(src), len(semantic_ids)
    log_likelihood = item_log_likelihood(model, src.repeat_interleave(n_items, 0), semantic_ids.repeat(n_users, 1),
                                         trie).view(n_users, n_items)
    torch.testing.assert_close(log_likelihood.exp().sum(1), torch.ones(n_users))
    # Renormalising over the real children only raises each item's probability above the free decoder's.
    assert (log_likelihood >= exhaustive_item_scores(model, src, semantic_ids) - 1e-5).all()


def test_beam_returns_distinct_real_unseen_items_even_when_most_are_seen():
    model, semantic_ids, src = tiny_setup(n_items=20)
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES)
    seen = torch.zeros(len(src), 20, dtype=torch.bool)
    seen[:, :14] = True  # 6 unseen items per user, fewer than the beam
    result = beam_search(model, src, trie, beam_width=8, top_k=8, seen=seen)
    for row in result.items:
        real = row[row != NO_ITEM]
        assert sorted(real.tolist()) == list(range(14, 20))  # all unseen items found, none seen, no repeats
        assert (row[len(real):] == NO_ITEM).all()
    # The returned codes are the items' IDs.
    valid = result.items != NO_ITEM
    assert torch.equal(result.codes[valid], semantic_ids[result.items[valid]])


def test_narrow_beam_never_returns_invalid_ids_but_unconstrained_can():
    model, semantic_ids, src = tiny_setup(n_items=6, n_users=30)
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES)
    constrained = beam_search(model, src, trie, beam_width=4, top_k=4)
    assert (constrained.items != NO_ITEM).all()
    free = beam_search(model, src, trie, beam_width=4, top_k=4, constrained=False)
    # Unconstrained IDs are real items exactly when their codes appear in the table.
    table = {tuple(row) for row in semantic_ids.tolist()}
    is_real = torch.tensor([[tuple(c) in table for c in user] for user in free.codes.tolist()])
    assert torch.equal(is_real, free.items != NO_ITEM)
    assert (~is_real).any()  # 6 of 24 IDs exist: a random model invents some


def test_trie_rejects_duplicate_ids_and_maps_leaves_to_rows():
    ids = torch.tensor([[1, 0, 1], [0, 2, 0], [3, 1, 1]])
    trie = SemanticIdTrie(ids, CODEBOOK_SIZES)
    node, exists = trie.lookup(2, torch.tensor([(1 * 3 + 0) * 2 + 1, (0 * 3 + 2) * 2 + 1]))
    assert exists.tolist() == [True, False]
    assert trie.leaf_item[node[0]].item() == 0
    with pytest.raises(ValueError, match="not unique"):
        SemanticIdTrie(torch.tensor([[1, 0, 1], [1, 0, 1]]), CODEBOOK_SIZES)


def test_top_k_wider_than_beam_is_an_error():
    model, semantic_ids, src = tiny_setup()
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model, src, SemanticIdTrie(semantic_ids, CODEBOOK_SIZES), beam_width=5, top_k=10)


def test_random_semantic_ids_are_unique_in_range_and_seeded():
    ids = random_semantic_ids(20, CODEBOOK_SIZES, seed=3)
    assert len(np.unique(ids, axis=0)) == 20
    assert (ids < np.array(CODEBOOK_SIZES)).all() and (ids >= 0).all()
    assert np.array_equal(ids, random_semantic_ids(20, CODEBOOK_SIZES, seed=3))
    assert not np.array_equal(ids, random_semantic_ids(20, CODEBOOK_SIZES, seed=4))


@pytest.mark.parametrize("with_seen", [False, True])
def test_cached_beam_search_returns_the_items_and_scores_of_the_uncached_one(with_seen):
    """The KV cache changes the cost, not the result: same items in the same order, same scores."""
    model, semantic_ids, src = tiny_setup(n_items=20, n_users=7)
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES)
    seen = torch.zeros(len(src), len(semantic_ids), dtype=torch.bool)
    seen[torch.arange(len(src)), torch.arange(len(src))] = True
    kwargs = dict(beam_width=6, top_k=5, seen=seen if with_seen else None)
    cached = beam_search(model, src, trie, cache=True, **kwargs)
    uncached = beam_search(model, src, trie, cache=False, **kwargs)
    assert torch.equal(cached.items, uncached.items)
    assert torch.equal(cached.codes, uncached.codes)
    torch.testing.assert_close(cached.scores, uncached.scores, rtol=1e-6, atol=1e-6)


def test_decode_step_equals_the_last_position_of_a_full_decode():
    model, semantic_ids, src = tiny_setup()
    memory, keep = model.encode(src)
    beams = 3
    prefixes = semantic_ids[torch.randint(0, len(semantic_ids), (len(src) * beams,))]
    state = model.start_decoding(memory, keep)
    with torch.no_grad():
        for level in range(prefixes.shape[1]):
            step = model.decode_step(state, prefixes[:, level - 1] if level else None, len(prefixes))
            full = model.decode(memory, keep, prefixes[:, :level])[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-6)
