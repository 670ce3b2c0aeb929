"""RQ-VAE model (modules/rqvae.py) and semantic-ID statistics (modules/semantic_ids.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.rqvae import RQVAE
from modules.semantic_ids import add_collision_column, codebook_sizes, genre_jaccard, health


def test_collision_column_numbers_duplicates_in_row_order():
    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2], [0, 1]])
    ids = add_collision_column(codes)
    np.testing.assert_array_equal(ids[:, -1], [0, 1, 0, 2, 0])
    np.testing.assert_array_equal(ids[:, :2], codes)
    assert codebook_sizes(ids, 4) == [4, 4, 3]


def test_collision_column_makes_every_id_unique():
    codes = np.random.default_rng(0).integers(0, 3, size=(500, 2))  # only 9 tuples: many collisions
    ids = add_collision_column(codes)
    assert len(np.unique(ids, axis=0)) == len(ids)
    assert ids.dtype == np.int64 and ids[:, -1].min() == 0


def test_health_statistics_on_known_codes():
    codes = np.array([[0, 0], [0, 1], [0, 1], [1, 2]])
    report = health(codes, codebook_size=4)
    assert report["usage"] == [0.5, 0.75]
    assert report["top_share"] == [0.75, 0.5]
    assert report["perplexity"][1] == pytest.approx(np.exp(-(0.25 * np.log(0.25) * 2 + 0.5 * np.log(0.5))))
    assert report["unique_fraction"] == 0.5
    assert report["max_collision_group"] == 2
    assert report["collapsed"] and "level 0" in report["collapse_reasons"][0]


def test_health_flags_low_usage_as_collapse():
    codes = np.stack([np.arange(1000) % 5, np.arange(1000) % 200], axis=1)
    report = health(codes, codebook_size=256)
    assert report["collapsed"] and any("level 0" in r and "codes are used" in r for r in report["collapse_reasons"])
    assert not any("level 1" in r for r in report["collapse_reasons"])


def test_genre_jaccard_same_code_pairs_beat_random_pairs_when_codes_follow_genres():
    rng = np.random.default_rng(0)
    first_code = rng.integers(0, 10, 400)
    genres = np.zeros((400, 10), dtype=bool)
    genres[np.arange(400), first_code] = True
    result = genre_jaccard(genres, first_code, n_pairs=2000)
    assert result["same_first_code"] == 1.0
    assert result["random_pairs"] < 0.2


def test_rqvae_shapes_and_losses():
    torch.manual_seed(0)
    model = RQVAE(input_dim=10, embed_dim=4, hidden_dims=(16, 8), codebook_size=8, n_levels=3)
    x = torch.randn(32, 10)
    model.quantizer.initialise(model.encoder(x))
    out = model(x)
    assert out.reconstruction.shape == (32, 10) and out.quantizer.codes.shape == (32, 3)
    expected = out.reconstruction_loss + out.quantizer.codebook_loss + 0.25 * out.quantizer.commitment_loss
    torch.testing.assert_close(out.total_loss, expected)
    codes = model.semantic_codes(x, batch_size=7)
    assert torch.equal(codes, model.semantic_codes(x))
    assert model.training  # semantic_codes restores the mode


@pytest.mark.parametrize("gradient", ["rotation", "straight_through"])
def test_rqvae_training_lowers_reconstruction_loss(gradient):
    torch.manual_seed(0)
    centres = torch.randn(8, 12) * 3
    x = centres[torch.randint(8, (256,))] + 0.1 * torch.randn(256, 12)
    model = RQVAE(input_dim=12, embed_dim=4, hidden_dims=(32, 16), codebook_size=8, n_levels=2, gradient=gradient)
    model.quantizer.initialise(model.encoder(x).detach())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(x).reconstruction_loss.item()
    for _ in range(150):
        out = model(x)
        optimizer.zero_grad()
        out.total_loss.backward()
        optimizer.step()
    assert model(x).reconstruction_loss.item() < 0.5 * first


def test_model_config_rebuilds_the_same_model():
    model = RQVAE(input_dim=6, embed_dim=3, hidden_dims=(8,), codebook_size=4, n_levels=2, init="random")
    clone = RQVAE(**model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(model.semantic_codes(x), clone.semantic_codes(x))
