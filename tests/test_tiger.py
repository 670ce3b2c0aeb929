"""Tiger encoder-decoder: causality, per-level distributions, shared-memory decoding, learning."""
import pytest
import torch

from modules.sequences import Vocabulary
from modules.tiger import Tiger

VOCAB = Vocabulary((5, 4, 3), n_user_buckets=6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed=0, **kwargs) -> Tiger:
    torch.manual_seed(seed)
    args = dict(embed_dim=16, attn_dim=24, n_heads=3, mlp_dim=32, n_layers=4, dropout=0.0) | kwargs
    return Tiger(VOCAB, max_history=3, **args).eval()


def random_batch(model: Tiger, batch=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB.size, (batch, model.src_length), generator=generator)
    src[:2, 1:5] = 0  # padded histories
    codes = torch.stack([torch.randint(0, k, (batch,), generator=generator) for k in VOCAB.codebook_sizes], 1)
    return src, codes


def test_each_level_is_a_distribution_over_its_own_codes():
    model = tiny_model()
    src, codes = random_batch(model)
    memory, keep = model.encode(src)
    for level, size in enumerate(VOCAB.codebook_sizes):
        log_probs = model.next_level_log_probs(memory, keep, codes[:, :level])
        assert log_probs.shape == (len(src), size)
        torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(len(src)))


def test_teacher_forcing_matches_step_by_step_decoding_and_is_causal():
    model = tiny_model()
    src, codes = random_batch(model)
    forced = model.sequence_log_probs(src, codes)
    memory, keep = model.encode(src)
    for level in range(VOCAB.n_levels):
        stepwise = model.next_level_log_probs(memory, keep, codes[:, :level]).gather(1, codes[:, level:level + 1])
        torch.testing.assert_close(forced[:, level], stepwise.squeeze(1), rtol=1e-5, atol=1e-5)
    # Changing the last code changes only the last level's log-prob (no look-ahead).
    changed = codes.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB.codebook_sizes[-1]
    other = model.sequence_log_probs(src, changed)
    torch.testing.assert_close(other[:, :-1], forced[:, :-1])
    assert not torch.allclose(other[:, -1], forced[:, -1])
    torch.testing.assert_close(model(src, codes), -forced.mean())


def test_shared_memory_decoding_equals_copied_memory():
    model = tiny_model()
    src, codes = random_batch(model)
    memory, keep = model.encode(src)
    group = 4
    prefixes = codes[:, :2].repeat_interleave(group, 0)
    prefixes[::2, 1] = 0
    shared = model.decode(memory, keep, prefixes)
    copied = model.decode(memory.repeat_interleave(group, 0), keep.repeat_interleave(group, 0), prefixes)
    torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-5)


def test_padding_positions_do_not_leak_into_the_memory_of_real_tokens():
    model = tiny_model()
    src, _ = random_batch(model)
    memory, keep = model.encode(src)
    assert not keep[:2, 1:5].any() and keep[:, 0].all()
    # PAD tokens are masked out of attention, so their embedding cannot reach any real token.
    with torch.no_grad():
        model.token_embedding.weight[0] += 10.0  # a different PAD embedding must not matter
    memory_after, _ = model.encode(src)
    torch.testing.assert_close(memory_after[keep], memory[keep], rtol=1e-5, atol=1e-5)


def test_a_few_steps_fit_a_fixed_batch():
    model = tiny_model(dropout=0.1).train()
    src, codes = random_batch(model, batch=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(src, codes).item()
    for _ in range(60):
        loss = model(src, codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.eval()(src, codes).item() < 0.3 * first


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="even"):
        tiny_model(n_layers=3)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        tiny_model(attn_dim=25)
    model = tiny_model()
    with pytest.raises(ValueError, match="expects 10"):
        model.encode(torch.ones(2, 7, dtype=torch.int64))


def test_causal_encoder_hides_later_history_items():
    model = tiny_model(causal_encoder=True)
    src, _ = random_batch(model)
    memory, _ = model.encode(src)
    changed = src.clone()
    changed[:, 1 + 2 * VOCAB.n_levels:] = 3  # rewrite history item 2 (the last of max_history 3)
    memory_changed, _ = model.encode(changed)
    first_items = 1 + 2 * VOCAB.n_levels
    torch.testing.assert_close(memory_changed[:, :first_items], memory[:, :first_items])
    assert not torch.allclose(memory_changed[:, first_items:], memory[:, first_items:])


def test_window_targets_see_only_their_own_slots_and_match_single_target_scoring():
    model = tiny_model(causal_encoder=True)
    src, codes = random_batch(model)
    generator = torch.Generator().manual_seed(3)
    targets = torch.stack([torch.randint(0, k, (len(src), 3), generator=generator) for k in VOCAB.codebook_sizes], 2)
    targets[:, 2] = codes
    visible = torch.tensor([[1, 2, 3]]).repeat(len(src), 1)
    window = model.window_log_probs(src, targets, visible)
    # The target that sees the whole window scores as the one-target path does.
    torch.testing.assert_close(window[:, 2], model.sequence_log_probs(src, codes), rtol=1e-5, atol=1e-5)
    # The first target sees history item 0 only: items 1 and 2 (its own item among them) cannot leak in.
    changed = src.clone()
    changed[:, 1 + VOCAB.n_levels:] = 4
    torch.testing.assert_close(model.window_log_probs(changed, targets, visible)[:, 0], window[:, 0])
    assert not torch.allclose(model.window_log_probs(changed, targets, visible)[:, 2], window[:, 2])
    # Absent targets (visible -1) do not count in the loss.
    absent = visible.clone()
    absent[:, 0] = -1
    expected = -window[:, 1:].mean()
    torch.testing.assert_close(model(src, targets, absent), expected, rtol=1e-5, atol=1e-5)


def test_partial_windows_with_a_bidirectional_encoder_are_an_error():
    model = tiny_model()
    src, codes = random_batch(model)
    with pytest.raises(ValueError, match="causal_encoder"):
        model(src, codes[:, None].repeat(1, 2, 1), torch.tensor([[2, 3]]).repeat(len(src), 1))
    full = model(src, codes[:, None], torch.full((len(src), 1), 3))  # whole window visible: allowed
    torch.testing.assert_close(full, model(src, codes), rtol=1e-5, atol=1e-5)


def test_output_head_stays_float32_under_bf16_autocast():
    # Beam scores must not be rounded to bf16 (8 mantissa bits): nearby codes would tie.
    model = tiny_model()
    hidden = torch.randn(7, 16)
    exact = model.level_logits(hidden, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = model.level_logits(hidden, 1)
        src, codes = random_batch(model)
        memory, keep = model.encode(src)
        log_probs = model.next_level_log_probs(memory, keep, codes[:, :1])
    assert autocast_logits.dtype == torch.float32 and log_probs.dtype == torch.float32
    torch.testing.assert_close(autocast_logits, exact, rtol=0, atol=0)
