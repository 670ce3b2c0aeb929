"""CUDA code paths (bf16 autocast, the trie and beam search on the GPU, SASRec scoring, train_decoder end to end),
checked against the float32 CPU reference on tiny random models. Skipped without a GPU; bench/gpu_check.sh
runs them on a GPU machine."""
import json
import logging

import numpy as np
import pytest
import torch

from modules.beam_search import NO_ITEM, SemanticIdTrie, beam_search
from modules.sasrec import SASRec
from modules.sequences import Vocabulary, random_semantic_ids, semantic_id_tokens
from modules.tiger import Tiger
from tests.test_baselines import TINY_MODEL as TINY_SASREC
from tests.test_train_decoder import make_run, run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: these run in bench/gpu_check.sh on a GPU machine")

CODEBOOK_SIZES = (4, 3, 2)  # 24 possible IDs
ML25M_CODEBOOK_SIZES = (256, 256, 256, 8)
CUDA = torch.device("cuda")


def bf16():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def tiny_tiger(codebook_sizes=CODEBOOK_SIZES, max_history=3, causal_encoder=False, seed=0) -> Tiger:
    """A random tiny Tiger in eval mode (no dropout), on the CPU; head dim 8, as the fused kernels need."""
    torch.manual_seed(seed)
    vocab = Vocabulary(tuple(codebook_sizes), n_user_buckets=5)
    return Tiger(vocab, max_history=max_history, embed_dim=32, attn_dim=32, n_heads=4, mlp_dim=64, n_layers=2,
                 causal_encoder=causal_encoder).eval()


def encoder_inputs(model: Tiger, semantic_ids: np.ndarray, n_users: int, seed: int = 0) -> torch.Tensor:
    """(n_users, S) encoder tokens of random real histories (a user token, then item codes), some padded."""
    rng = np.random.default_rng(seed)
    vocab = model.vocab
    tokens = semantic_id_tokens(semantic_ids, vocab)
    history = tokens[rng.integers(0, len(semantic_ids), (n_users, model.max_history))].reshape(n_users, -1)
    users = rng.integers(0, vocab.n_user_buckets, n_users) + vocab.user_token_offset
    src = torch.as_tensor(np.concatenate([users[:, None], history], 1))
    src[: n_users // 2, 1:1 + vocab.n_levels] = 0  # half the users have a shorter history
    return src


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float().cpu() - expected).norm() / expected.norm().clamp(min=1e-12)).item()


# ---------------------------------------------------------------- TIGER: loss and gradients

@pytest.mark.parametrize("targets_per_window", [1, 2], ids=["one_target", "windows_of_2"])
def test_tiger_loss_and_gradients_under_cuda_bf16_match_float32_cpu(targets_per_window):
    model = tiny_tiger(causal_encoder=targets_per_window > 1)
    semantic_ids = random_semantic_ids(20, CODEBOOK_SIZES, seed=0)
    src = encoder_inputs(model, semantic_ids, n_users=16)
    rng = np.random.default_rng(1)
    if targets_per_window == 1:
        args = (torch.as_tensor(semantic_ids[rng.integers(0, 20, 16)]),)
    else:  # the window's last two slots as targets, each seeing the slots before it
        args = (torch.as_tensor(semantic_ids[rng.integers(0, 20, (16, 2))]), torch.tensor([[2, 3]]).repeat(16, 1))

    def loss_and_grads(net, device, autocast):
        net.zero_grad()
        with autocast:
            loss = net(src.to(device), *(a.to(device) for a in args))
        loss.backward()
        return loss.detach(), {name: p.grad.detach().clone() for name, p in net.named_parameters() if p.grad is not None}

    cpu_loss, cpu_grads = loss_and_grads(model, "cpu", torch.autocast("cpu", enabled=False))
    gpu = model.to(CUDA)
    fp32_loss, fp32_grads = loss_and_grads(gpu, CUDA, torch.autocast("cuda", enabled=False))
    bf16_loss, bf16_grads = loss_and_grads(gpu, CUDA, bf16())

    assert bf16_loss.dtype == torch.float32  # the log-softmax runs in float32 under autocast
    torch.testing.assert_close(fp32_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bf16_loss.cpu(), cpu_loss, rtol=2e-2, atol=1e-3)  # bf16: 8-bit mantissa
    assert set(bf16_grads) == set(cpu_grads)
    for name, expected in cpu_grads.items():
        assert bf16_grads[name].dtype == torch.float32, name  # autocast keeps float32 master gradients
        assert relative_error(fp32_grads[name], expected) < 1e-3, name
        if expected.norm() > 1e-6:  # (a parameter with a near-zero gradient has no meaningful relative error)
            assert relative_error(bf16_grads[name], expected) < 0.08, name
    # The gradient overall points the same way, to well under bf16's per-element error.
    flat_cpu = torch.cat([g.flatten() for g in cpu_grads.values()])
    flat_bf16 = torch.cat([bf16_grads[n].flatten().cpu() for n in cpu_grads])
    assert torch.nn.functional.cosine_similarity(flat_cpu, flat_bf16, dim=0) > 0.999


# ---------------------------------------------------------------- beam search on the GPU

@pytest.mark.parametrize("cache", [True, False], ids=["kv_cache", "no_cache"])
def test_cuda_beam_search_in_float32_returns_the_cpu_items(cache):
    model = tiny_tiger()
    semantic_ids = torch.as_tensor(random_semantic_ids(20, CODEBOOK_SIZES, seed=2))
    src = encoder_inputs(model, semantic_ids.numpy(), n_users=9)
    seen = torch.zeros(len(src), len(semantic_ids), dtype=torch.bool)
    seen[torch.arange(len(src)), torch.arange(len(src))] = True
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES)
    kwargs = dict(beam_width=8, top_k=6, cache=cache)
    with torch.no_grad():
        on_cpu = beam_search(model, src, trie, seen=seen, **kwargs)
        on_gpu = beam_search(model.to(CUDA), src.to(CUDA), trie.to(CUDA), seen=seen.to(CUDA), **kwargs)
    assert on_gpu.items.device.type == "cuda"
    assert torch.equal(on_gpu.items.cpu(), on_cpu.items)
    assert torch.equal(on_gpu.codes.cpu(), on_cpu.codes)
    torch.testing.assert_close(on_gpu.scores.cpu(), on_cpu.scores, rtol=1e-4, atol=1e-4)


def assert_valid_beams(result, semantic_ids: torch.Tensor, seen: torch.Tensor, top_k: int) -> None:
    """Every returned item is a real, unseen, distinct row whose codes are its semantic ID, best first."""
    items, codes, scores = result.items.cpu(), result.codes.cpu(), result.scores.cpu()
    assert items.shape == (len(seen), top_k)
    assert (items != NO_ITEM).all() and (items >= 0).all() and (items < len(semantic_ids)).all()
    assert torch.equal(codes, semantic_ids[items])
    assert not seen.gather(1, items).any()
    assert all(len(set(row.tolist())) == top_k for row in items)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_cuda_beam_search_under_bf16_returns_valid_real_items():
    model = tiny_tiger().to(CUDA)
    semantic_ids = torch.as_tensor(random_semantic_ids(20, CODEBOOK_SIZES, seed=3))
    src = encoder_inputs(model, semantic_ids.numpy(), n_users=12)
    seen = torch.zeros(len(src), len(semantic_ids), dtype=torch.bool)
    seen[:, :8] = True  # 12 unseen items per user, more than top_k
    trie = SemanticIdTrie(semantic_ids, CODEBOOK_SIZES).to(CUDA)
    for cache in (True, False):
        with torch.no_grad(), bf16():
            result = beam_search(model, src.to(CUDA), trie, beam_width=10, top_k=8, seen=seen.to(CUDA), cache=cache)
        assert_valid_beams(result, semantic_ids, seen, top_k=8)


def test_cuda_beam_search_at_ml25m_catalogue_size_under_bf16():
    """62,423 items with (256, 256, 256, 8) codebooks, beam 20 / top-10 with 50 seen items per user, as the
    benchmark and a real ML-25M evaluation decode them: the trie's keys and masks at full size on the GPU."""
    model = tiny_tiger(ML25M_CODEBOOK_SIZES, max_history=5).to(CUDA)
    semantic_ids = torch.as_tensor(random_semantic_ids(62423, ML25M_CODEBOOK_SIZES, seed=0))
    src = encoder_inputs(model, semantic_ids.numpy(), n_users=32)
    rng = np.random.default_rng(0)
    seen = torch.zeros(len(src), len(semantic_ids), dtype=torch.bool)
    seen[torch.arange(len(src))[:, None], torch.as_tensor(rng.integers(0, len(semantic_ids), (len(src), 50)))] = True
    trie = SemanticIdTrie(semantic_ids, ML25M_CODEBOOK_SIZES).to(CUDA)
    with torch.no_grad(), bf16():
        result = beam_search(model, src.to(CUDA), trie, beam_width=20, top_k=10, seen=seen.to(CUDA))
    assert_valid_beams(result, semantic_ids, seen, top_k=10)


# ---------------------------------------------------------------- SASRec scoring

def test_sasrec_score_next_on_cuda_bf16_is_float32_and_close_to_cpu():
    torch.manual_seed(0)
    model = SASRec(n_items=300, **TINY_SASREC).eval()
    tokens = torch.randint(1, 301, (8, 12))
    tokens[:3, :5] = 0  # left padding
    expected = model.score_next(tokens)
    gpu = model.to(CUDA)
    with torch.no_grad(), bf16():
        scores = gpu.score_next(tokens.to(CUDA))
        hidden = gpu(tokens.to(CUDA))[:, -1].float()
    assert scores.dtype == torch.float32 and scores.shape == (8, 300)
    # The catalogue product itself ran in float32 (autocast disabled inside score_next), not in bf16 ...
    with torch.autocast("cuda", enabled=False):
        float32_product = hidden @ gpu.item_embedding.weight[1:].T.float()
    torch.testing.assert_close(scores, float32_product, rtol=1e-5, atol=1e-6)
    # ... and only the bf16 transformer separates it from the CPU reference.
    assert relative_error(scores, expected) < 0.03
    top_gpu, top_cpu = scores.topk(10).indices.cpu(), expected.topk(10).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_gpu, top_cpu)])
    assert overlap >= 0.8


# ---------------------------------------------------------------- train_decoder end to end

def test_train_decoder_runs_end_to_end_on_cuda(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = make_run(tmp_path / "run")
    report = run_train(run, tmp_path / "out")
    assert "device cuda" in caplog.text and "bf16 autocast" in caplog.text
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["n_test_users"] == 30
    for split in ("valid", "test"):
        assert 0 <= report[split]["ndcg@10"] <= report[split]["recall@10"] <= 1
        assert 0 < report[split]["nll"] < float("inf")
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 8
    weights = list(checkpoint["model"].values())
    assert all(w.is_cuda for w in weights)  # trained on the GPU, not silently on the CPU
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())
