"""Adaptive multimodal fusion in the RQ-VAE (modules/fusion.py, RQVAE.fusion, train_rqvae.py): masked block
weights, invariance to absent blocks, block dropout, the unchanged 'concat' model, checkpoints, the written
block weights and the fingerprint, and a gate that learns which block carries the signal."""
from __future__ import annotations

import json

import gin
import numpy as np
import pytest
import torch

import train_rqvae
from experiments.artifacts import ArtifactError, StaleOutputError
from modules.fusion import BlockFusion, BlockSpec, drop_blocks
from modules.quantizer import ResidualQuantizer
from modules.rqvae import RQVAE, mlp
from tests.test_train_rqvae import fused_run, kill_after_first_checkpoint, run_training  # noqa: F401 (fused_run: pytest fixture)

MODES = ["gated", "attention"]
# 12 columns: a (0-3) always present, b (4-6) masked by column 7, c (8-10) masked by column 11.
LAYOUT = [{"name": "a", "feature_columns": [0, 4]},
          {"name": "b", "feature_columns": [4, 7], "mask_column": 7, "mask_threshold": 0.0},
          {"name": "c", "feature_columns": [8, 11], "mask_column": 11, "mask_threshold": 0.0}]
# A few steps on 60 items may collapse a codebook (the collapse guard has its own tests in test_train_rqvae.py).
ALLOW_COLLAPSED = "train_rqvae.allow_collapsed = True"
ORIGINAL_CONFIG_KEYS = {"input_dim", "embed_dim", "hidden_dims", "codebook_size", "n_levels", "commitment_weight",
                        "gradient", "init", "dead_code_steps", "dropout"}


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def items_with_layout(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, 12) in LAYOUT with step 5's conventions (absent block: zeros and a negative mask value) and the
    true presence (n, 3); row 0 has only block a, row 1 every block."""
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(n, 3, generator=g) < 0.6
    present[:, 0] = True
    present[0, 1:], present[1] = False, True
    x = torch.randn(n, 12, generator=g)
    for index, (start, stop, mask) in enumerate([(4, 7, 7), (8, 11, 11)], start=1):
        x[:, start:stop] *= present[:, index:index + 1]
        x[:, mask] = torch.where(present[:, index], 0.8, -1.2)
    return x, present


def gated_model(mode: str = "gated", block_dropout: float = 0.0, seed: int = 0) -> RQVAE:
    torch.manual_seed(seed)
    return RQVAE(input_dim=12, embed_dim=4, hidden_dims=(16,), codebook_size=8, n_levels=2, init="random",
                 fusion=mode, blocks=LAYOUT, fusion_dim=8, block_dropout=block_dropout,
                 fusion_heads=2 if mode == "attention" else 1)


@pytest.mark.parametrize("mode", MODES)
def test_weights_sum_to_one_over_present_blocks_and_are_exactly_zero_on_absent_ones(mode):
    x, present = items_with_layout()
    fusion = gated_model(mode).block_fusion.eval()
    assert torch.equal(fusion.presence(x), present)
    out = fusion(x)
    assert out.fused.shape == (len(x), 8) and out.weights.shape == (len(x), 3)
    assert torch.all(out.weights[~present] == 0.0)
    assert torch.all(out.weights[present] > 0.0)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(len(x)))
    assert torch.equal(out.weights[0], torch.tensor([1.0, 0.0, 0.0]))    # one present block takes it all


@pytest.mark.parametrize("mode", MODES)
def test_an_absent_blocks_feature_values_change_nothing(mode):
    x, present = items_with_layout()
    model = gated_model(mode).eval()
    perturbed = x.clone()
    for index, (start, stop) in enumerate([(4, 7), (8, 11)], start=1):
        absent = ~present[:, index]
        perturbed[absent, start:stop] = torch.randn(int(absent.sum()), stop - start) * 1e4
    perturbed[~present[:, 2], 8] = float("inf")                         # not even inf leaks through the mask
    assert not torch.equal(perturbed, x)
    for a, b in ((model.block_fusion(x).fused, model.block_fusion(perturbed).fused),
                 (model.block_weights(x), model.block_weights(perturbed)),
                 (model.semantic_codes(x), model.semantic_codes(perturbed))):
        assert torch.equal(a, b)
    # ... while a present block's values do change the fused vector.
    moved = x.clone()
    moved[1, 4:7] += 1.0
    assert not torch.equal(model.block_fusion(moved).fused[1], model.block_fusion(x).fused[1])


@pytest.mark.parametrize("mode", MODES)
def test_block_dropout_acts_only_in_training_and_never_drops_every_present_block(mode):
    x, present = items_with_layout(n=512)
    model = gated_model(mode, block_dropout=0.5)
    fusion = model.block_fusion.train()
    out = fusion(x)
    assert torch.all(out.used <= present)                                  # never adds a block
    assert torch.all(out.used.any(1))                                      # never drops all of an item's
    assert torch.all(out.weights[~out.used] == 0.0)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(len(x)))
    assert (present & ~out.used).any()                                     # it does drop some
    assert not torch.equal(fusion(x).used, out.used)                       # ... at random
    fusion.eval()
    first, second = fusion(x), fusion(x)
    assert torch.equal(first.used, present) and torch.equal(first.fused, second.fused)
    # Near-certain dropout leaves exactly one block per item, one it has, chosen at random.
    kept = drop_blocks(present, 0.999)
    assert torch.all(kept.sum(1) == 1) and torch.all(kept <= present)
    assert len(torch.unique(kept[present.all(1)].float().argmax(1))) == 3


def test_invalid_settings_and_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="RQVAE.fusion must be one of"):
        RQVAE(input_dim=12, fusion="sum")
    with pytest.raises(ValueError, match="needs the block layout"):
        RQVAE(input_dim=12, fusion="gated")
    with pytest.raises(ValueError, match="block_dropout = 0.1 needs RQVAE.fusion"):
        RQVAE(input_dim=12, block_dropout=0.1)
    with pytest.raises(ValueError, match="block_dropout must be in"):
        BlockFusion(LAYOUT, 12, block_dropout=1.0)
    with pytest.raises(ValueError, match="overlap"):
        BlockFusion(LAYOUT + [{"name": "d", "feature_columns": [2, 5]}], 12)
    with pytest.raises(ValueError, match=r"\[10, 14\) must be a non-empty range inside the 12"):
        BlockFusion([{"name": "d", "feature_columns": [10, 14]}], 12)
    with pytest.raises(ValueError, match="mask_column 5 must be an input column outside"):
        BlockFusion([{"name": "a", "feature_columns": [0, 6], "mask_column": 5, "mask_threshold": 0.0}], 12)
    only_masked = BlockFusion(LAYOUT[1:], 12).eval()
    x, _ = items_with_layout()
    with pytest.raises(ValueError, match=r"rows of the batch \(first: \[0, .*have none of the blocks \['b', 'c'\]"):
        only_masked(x)


def test_concat_is_the_model_from_before_adaptive_fusion():
    """Same seed -> same parameters (the same draws in the same order), keys, config and outputs as the
    original encoder-quantizer-decoder, so old checkpoints load and old runs resume."""
    settings = dict(embed_dim=4, hidden_dims=(16, 8), codebook_size=8, n_levels=2)
    torch.manual_seed(3)
    model = RQVAE(input_dim=12, dropout=0.0, **settings)
    torch.manual_seed(3)
    widths = [12, 16, 8, 4]
    reference = torch.nn.ModuleDict({"encoder": mlp(widths), "decoder": mlp(widths[::-1]),
                                     "quantizer": ResidualQuantizer(2, 8, 4)})
    assert set(model.config) == ORIGINAL_CONFIG_KEYS and model.block_fusion is None
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    x = torch.randn(32, 12)
    model.quantizer.initialise(model.encode(x), torch.Generator().manual_seed(0))
    reference["quantizer"].initialise(reference["encoder"](x), torch.Generator().manual_seed(0))
    quantized = reference["quantizer"](reference["encoder"](x))
    out = model(x)
    assert torch.equal(out.quantizer.codes, quantized.codes)
    assert torch.equal(out.reconstruction, reference["decoder"](quantized.quantized))
    with pytest.raises(ValueError, match="'concat' weighs no blocks"):
        model.block_weights(x)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_round_trip_rebuilds_the_fused_model_without_gin(mode, tmp_path):
    x, _ = items_with_layout()
    model = gated_model(mode, block_dropout=0.2)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config}, path)
    loaded = train_rqvae.load_model(path)
    assert loaded.fusion == mode and loaded.config == model.config
    assert [b.to_config() for b in loaded.block_fusion.blocks] == [BlockSpec.from_config(b).to_config()
                                                                    for b in LAYOUT]
    assert torch.equal(loaded.semantic_codes(x), model.semantic_codes(x))
    assert torch.equal(loaded.block_weights(x), model.block_weights(x))


def test_fusion_blocks_reads_presence_from_the_mask_column_and_checks_it(fused_run):
    features, meta = train_rqvae.load_item_features(fused_run / "item_features", fused_run)
    path = fused_run / "item_features" / "blocks.json"
    layout = train_rqvae.fusion_blocks(features, meta["blocks"], path)
    fusion = BlockFusion(layout, features.shape[1])
    present = fusion.presence(torch.from_numpy(features)).numpy()
    assert [b["name"] for b in layout] == ["genres", "year", "tags", "poster"] and layout[0]["mask_column"] is None
    for index, block in enumerate(meta["blocks"]):
        assert present[:, index].sum() == block["n_items_with_block"]
    assert not present[1, 1]                                # the fixture's item without a year
    broken = [dict(b) for b in meta["blocks"]]
    broken[3]["n_items_with_block"] -= 1
    with pytest.raises(ArtifactError, match=r"mask column \d+ of block 'poster'.*blocks.json says"):
        train_rqvae.fusion_blocks(features, broken, path)
    nobody = [dict(b) for b in meta["blocks"]]
    nobody[1]["n_items_with_block"] = 0
    with pytest.raises(ArtifactError, match="no item has block 'year'"):
        train_rqvae.fusion_blocks(features, nobody, path)
    everybody = features.copy()
    everybody[:, meta["blocks"][1]["mask_column"]] = 0.0    # step 5's mask column when every item has the block
    complete = [dict(b) for b in meta["blocks"]]
    complete[1]["n_items_with_block"] = len(features)
    assert train_rqvae.fusion_blocks(everybody, complete, path)[1]["mask_column"] is None


def test_gated_training_run_writes_block_weights_and_their_summary(fused_run):
    report = run_training(fused_run, ["RQVAE.fusion = 'gated'", "RQVAE.fusion_dim = 8", "RQVAE.block_dropout = 0.2",
                                      ALLOW_COLLAPSED], iterations=3)
    out = fused_run / "rqvae"
    weights = np.load(out / "item_block_weights.npy")
    features, meta = train_rqvae.load_item_features(fused_run / "item_features", fused_run)
    names = [b["name"] for b in meta["blocks"]]
    assert weights.shape == (len(np.load(out / "movie_ids.npy")), len(names)) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
    model = train_rqvae.load_model(out / "model.pt")
    assert model.fusion == "gated" and model.config["block_dropout"] == 0.2
    present = model.block_fusion.presence(torch.from_numpy(features)).numpy()
    assert (weights[~present] == 0).all() and (weights[present] > 0).all()
    np.testing.assert_array_equal(model.block_weights(torch.from_numpy(features)).numpy(), weights)
    np.testing.assert_array_equal(train_rqvae.semantic_ids_from_checkpoint(out, fused_run),
                                  np.load(out / "semantic_ids.npy"))

    health = json.loads((out / "health.json").read_text())
    assert health == json.loads(json.dumps(report))
    summary = health["block_fusion"]
    assert summary["fusion"] == "gated" and summary["file"] == "item_block_weights.npy" and summary["blocks"] == names
    top = weights.argmax(1)
    for index, (name, block) in enumerate(zip(names, meta["blocks"])):
        stats = summary["per_block"][name]
        has = present[:, index]
        assert stats["n_items_with_block"] == block["n_items_with_block"] == has.sum()
        assert stats["mean_weight_when_present"] == pytest.approx(float(weights[has, index].mean()))
        assert stats["top_block_share"] == pytest.approx(float((top == index).mean()))
    assert sum(s["top_block_share"] for s in summary["per_block"].values()) == pytest.approx(1.0)
    assert health["fingerprint"]["config"]["RQVAE.fusion"] == "gated"

    run_training(fused_run)                                 # concat retrained over it: no stale weights file
    assert not (out / "item_block_weights.npy").exists()


def test_the_fingerprint_holds_the_fusion_and_concat_keeps_its_old_one(fused_run):
    concat = run_training(fused_run)
    assert not any(key in concat["fingerprint"]["config"] for key in
                   ("RQVAE.fusion", "RQVAE.fusion_dim", "RQVAE.block_dropout", "RQVAE.fusion_heads", "RQVAE.blocks"))
    gated = ["RQVAE.fusion = 'gated'", ALLOW_COLLAPSED]
    with pytest.raises(StaleOutputError, match="config RQVAE.fusion: <unset> -> gated"):
        run_training(fused_run, gated, overwrite=False)
    finished = run_training(fused_run, gated)
    with pytest.raises(StaleOutputError, match="config RQVAE.fusion: gated -> attention"):
        run_training(fused_run, ["RQVAE.fusion = 'attention'", ALLOW_COLLAPSED], overwrite=False)
    with pytest.raises(StaleOutputError, match="config RQVAE.block_dropout: 0.0 -> 0.3"):
        run_training(fused_run, gated + ["RQVAE.block_dropout = 0.3"], overwrite=False)
    assert run_training(fused_run, gated, overwrite=False) == finished     # the same settings: reused


def test_the_block_layout_cannot_be_bound_in_gin():
    with pytest.raises(ValueError, match="denylisted kwarg .blocks."):
        train_rqvae.parse_config([], ["RQVAE.blocks = []"])


def test_a_resumed_run_with_block_dropout_is_the_uninterrupted_run(fused_run, monkeypatch):
    """torch's global generator (block dropout) is saved in the checkpoint and restored on resume."""
    gated = ["RQVAE.fusion = 'gated'", "RQVAE.fusion_dim = 8", "RQVAE.block_dropout = 0.5",
             "train_rqvae.log_every = 4", ALLOW_COLLAPSED]
    kill_after_first_checkpoint(fused_run, monkeypatch, gated)
    run_training(fused_run, gated, iterations=4, overwrite=False)
    resumed = torch.load(fused_run / "rqvae" / "model.pt", weights_only=True)["model"]
    run_training(fused_run, gated, iterations=4)
    uninterrupted = torch.load(fused_run / "rqvae" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("mode", MODES)
def test_the_gate_learns_to_weigh_the_block_that_carries_the_signal(mode, one_torch_thread):
    """Block 'signal' (24 columns) follows 8 clusters, which the codes can capture; block 'noise' (4 columns)
    is i.i.d. noise that no code captures. Reconstruction training moves the weight to the signal block."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(8, (512,), generator=g)
    signal = torch.randn(8, 24, generator=g)[labels] + 0.1 * torch.randn(512, 24, generator=g)
    x = torch.cat([torch.randn(512, 4, generator=g), signal], dim=1)
    torch.manual_seed(0)
    model = RQVAE(input_dim=28, embed_dim=4, hidden_dims=(32,), codebook_size=8, n_levels=2,
                  gradient="straight_through", fusion=mode, fusion_dim=16,
                  blocks=[{"name": "noise", "feature_columns": [0, 4]}, {"name": "signal", "feature_columns": [4, 28]}])
    model.quantizer.initialise(model.encode(x).detach(), torch.Generator().manual_seed(0))
    before = model.block_weights(x).mean(0)[1].item()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(x).total_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.block_weights(x).mean(0)[1].item()
    assert after > 0.7 and after > before + 0.15, (before, after)
