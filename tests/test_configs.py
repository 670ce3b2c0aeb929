"""Every gin file in configs/ parses against the code it configures, and a binding typo fails at parse time."""
from __future__ import annotations

from pathlib import Path

import gin
import pytest

import experiments.baselines  # noqa: F401  (registers SASRec, train_sasrec)
import train_decoder  # noqa: F401  (registers Tiger, train_decoder)
import train_rqvae  # noqa: F401  (registers ML25MItemData, RQVAE, train_rqvae)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.gin"))


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    gin.add_config_file_search_path(str(REPO))
    yield
    gin.clear_config()


def test_every_trainer_has_its_three_presets():
    names = {p.name for p in CONFIGS}
    for trainer in ("rqvae", "decoder", "sasrec"):
        assert {f"{trainer}_{preset}.gin" for preset in ("ml25m", "ml_small", "demo")} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config):
    gin.parse_config_file(str(config))
    root = {"rqvae": "train_rqvae", "decoder": "train_decoder", "sasrec": "train_sasrec"}[config.name.split("_")[0]]
    assert isinstance(gin.query_parameter(f"{root}.seed"), int)   # raises if the trainer's root is not bound


def test_binding_to_a_missing_parameter_fails_at_parse_time():
    with pytest.raises(ValueError, match="no_such_parameter"):
        gin.parse_config("train_rqvae.no_such_parameter = 3")
