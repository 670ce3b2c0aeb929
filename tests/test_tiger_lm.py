"""The decoder-only layouts (TigerLM: token stream; TigerItemLM: item stream with a code head): causality,
the window loss, cached decoding, exact beam search, learning. Every test runs on both."""
import pytest
import torch

from modules.beam_search import SemanticIdTrie, beam_search, exhaustive_item_scores
from modules.sequences import N_SPECIAL_TOKENS, Vocabulary, random_semantic_ids
from modules.tiger_lm import TigerItemLM, TigerLM

VOCAB = Vocabulary((5, 4, 3), n_user_buckets=6)
HISTORY = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=[TigerLM, TigerItemLM], ids=["token_stream", "item_stream"])
def tiny_model(request):
    def build(seed=0, **kwargs):
        torch.manual_seed(seed)
        args = dict(embed_dim=16, attn_dim=24, n_heads=3, mlp_dim=32, n_layers=3, dropout=0.0) | kwargs
        return request.param(VOCAB, max_history=HISTORY, **args).eval()
    return build


def item_tokens(codes: torch.Tensor) -> torch.Tensor:
    """(..., L+1) codes -> their tokens."""
    return codes + N_SPECIAL_TOKENS + torch.as_tensor(VOCAB.level_offsets)


def random_codes(shape, generator) -> torch.Tensor:
    return torch.stack([torch.randint(0, k, shape, generator=generator) for k in VOCAB.codebook_sizes], -1)


def random_window(batch=5, seed=1):
    """src (B, S) of H items (the first two users padded), the window's H+1 item codes (B, H+1, L+1)."""
    generator = torch.Generator().manual_seed(seed)
    codes = random_codes((batch, HISTORY + 1), generator)
    users = torch.randint(0, VOCAB.n_user_buckets, (batch, 1), generator=generator) + VOCAB.user_token_offset
    src = torch.cat([users, item_tokens(codes[:, :HISTORY]).reshape(batch, -1)], 1)
    src[:2, 1:1 + VOCAB.n_levels] = 0  # one padded slot
    return src, codes


def test_each_level_is_a_distribution_and_teacher_forcing_matches_stepwise_decoding(tiny_model):
    model = tiny_model()
    src, codes = random_window()
    target = codes[:, -1]
    forced = model.sequence_log_probs(src, target)
    history, keep = model.encode(src)
    for level, size in enumerate(VOCAB.codebook_sizes):
        log_probs = model.next_level_log_probs(history, keep, target[:, :level])
        assert log_probs.shape == (len(src), size)
        torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(len(src)))
        torch.testing.assert_close(log_probs.gather(1, target[:, level:level + 1]).squeeze(1), forced[:, level],
                                   rtol=1e-5, atol=1e-5)
    changed = target.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB.codebook_sizes[-1]
    other = model.sequence_log_probs(src, changed)
    torch.testing.assert_close(other[:, :-1], forced[:, :-1])  # a later code never reaches an earlier level
    assert not torch.allclose(other[:, -1], forced[:, -1])


def test_window_targets_see_only_earlier_items_and_the_last_one_is_the_next_item(tiny_model):
    model = tiny_model()
    src, codes = random_window()
    targets = codes[:, -3:]                        # the window's last 3 items: slots H-2, H-1, H
    visible = torch.tensor([[HISTORY - 2, HISTORY - 1, HISTORY]] * len(src))
    window = model.window_log_probs(src, targets, visible)
    torch.testing.assert_close(window[:, -1], model.sequence_log_probs(src, codes[:, -1]), rtol=1e-5, atol=1e-5)
    # Change history slot H-1 (the second target): the first target's log-probs do not move, the last one's do.
    changed_codes = codes.clone()
    changed_codes[:, HISTORY - 1] = (changed_codes[:, HISTORY - 1] + 1) % torch.tensor(VOCAB.codebook_sizes)
    changed_src = src.clone()
    changed_src[:, 1 + (HISTORY - 1) * VOCAB.n_levels:] = item_tokens(changed_codes[:, HISTORY - 1])
    after = model.window_log_probs(changed_src, changed_codes[:, -3:], visible)
    torch.testing.assert_close(after[:, 0], window[:, 0])
    assert not torch.allclose(after[:, 2], window[:, 2])
    # The loss averages the present targets only.
    present = visible.clone()
    present[:, 0] = -1
    expected = -window[:, 1:].mean()
    torch.testing.assert_close(model(src, targets, present), expected, rtol=1e-5, atol=1e-5)


def test_cached_steps_and_shared_histories_equal_a_full_decode(tiny_model):
    model = tiny_model()
    src, codes = random_window()
    history, keep = model.encode(src)
    group = 3
    prefixes = codes[:, -1].repeat_interleave(group, 0)
    prefixes[::2, 0] = 0
    full = model.decode(history, keep, prefixes[:, :-1])               # (R, L, E) for R = G*B rows
    copied_history, copied_keep = model.encode(src.repeat_interleave(group, 0))
    torch.testing.assert_close(model.decode(copied_history, copied_keep, prefixes[:, :-1]), full, rtol=1e-5, atol=1e-5)
    cache = model.start_decoding(history, keep)
    for level in range(VOCAB.n_levels):
        hidden = model.decode_step(cache, prefixes[:, level - 1] if level else None, len(prefixes))
        torch.testing.assert_close(hidden, full[:, level], rtol=1e-5, atol=1e-5)


def test_beam_search_with_the_whole_catalogue_as_beam_is_exact(tiny_model):
    model = tiny_model()
    src, _ = random_window()
    ids = torch.as_tensor(random_semantic_ids(30, VOCAB.codebook_sizes, 0))
    trie = SemanticIdTrie(ids, VOCAB.codebook_sizes)
    cached = beam_search(model, src, trie, beam_width=30, top_k=10, cache=True)
    uncached = beam_search(model, src, trie, beam_width=30, top_k=10, cache=False)
    exact = exhaustive_item_scores(model, src, ids).topk(10)
    assert torch.equal(cached.items, uncached.items) and torch.equal(cached.items, exact.indices)
    torch.testing.assert_close(cached.scores, exact.values, rtol=1e-5, atol=1e-5)


def test_padding_is_a_constant_input_that_training_never_changes(tiny_model):
    """PAD tokens are attended to (no padding mask, for the fused causal kernel), so they must carry nothing:
    their embedding is zero and gets no gradient; only their position tells the model the history is short."""
    model = tiny_model().train()
    src, codes = random_window()
    assert (src == 0).any()
    model(src, codes[:, -2:], torch.tensor([[HISTORY - 1, HISTORY]] * len(src))).backward()
    assert torch.equal(model.token_embedding.weight[0], torch.zeros(16))
    assert torch.equal(model.token_embedding.weight.grad[0], torch.zeros(16))
    assert model.token_embedding.weight.grad[src[0, -1]].abs().sum() > 0


def test_a_few_steps_fit_a_fixed_batch_and_bad_shapes_are_errors(tiny_model):
    model = tiny_model(dropout=0.1).train()
    src, codes = random_window(batch=8)
    targets, visible = codes[:, -4:], torch.tensor([[1, 2, 3, 4]] * 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(src, targets, visible).item()
    for _ in range(80):
        loss = model(src, targets, visible)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.eval()(src, targets, visible).item() < 0.3 * first
    with pytest.raises(ValueError, match="expects 13"):
        model.encode(torch.ones(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="1..max_history"):
        model.window_log_probs(src, codes, torch.zeros(8, HISTORY + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="visible_items"):
        model(src, targets)
