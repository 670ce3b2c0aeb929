"""Poster galleries of a finished run (step 12): what a first-level code groups, and what TIGER recommends.

    python experiments/12_gallery.py --run runs/ml_small --posters dataset/ml-latest-small/posters

Reads RUN/items.csv and RUN/item_ids.npy (step 2), RUN/rqvae/{semantic_ids.npy, movie_ids.npy,
semantic_ids.json} (train_rqvae.py), a train_decoder.py folder (default RUN/decoder: config.gin, best.pt,
metrics.json) and a folder of {movieId}.jpg posters. Writes into OUT (default RUN/gallery):

- codes.png: one strip per sampled first-level code (the most populated ones, or a seeded random sample):
  up to `per_code` posters of its items (a seeded sample, ordered by their full semantic ID so that the
  second-level groups sit together), captioned with the code, its item count and its top genres.
- users.png: one strip per sampled test user: the last `n_history` events before their leave-one-out test
  target (the input the evaluation gives the encoder, which reads the last `max_history` of them), the
  target, then TIGER's top-k from constrained beam search with the input's items excluded, exactly as
  train_decoder.evaluate ranks it; the target is framed green when it is in the top-k (and so is its tile
  there), red when it is not.
- gallery.md: an index with relative links, a table per gallery and the count of missing posters.
- gallery.json: the layout (every strip's tiles, in order) and the counts.

A missing or unreadable poster is a grey tile with its movieId, counted in gallery.md; nothing crashes on it.
Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gin
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageOps

import train_decoder
from experiments import artifacts
from experiments.baselines import check_result_is_current
from modules.beam_search import SemanticIdTrie, beam_search
from modules.sequences import NO_ITEM, history_windows

log = logging.getLogger(__name__)

GALLERY_SCRIPT = "experiments/12_gallery.py"
CODE_ORDERS = ("largest", "random")
TILE_SIZE = (72, 108)          # width, height in pixels: posters are 2:3 portraits
GAP, SEPARATOR = 4, 28         # pixels between tiles, and before the target and before the top-k
TITLE_PX, LABEL_PX, MARGIN_PX = 22, 26, 8
TITLE_CHAR_PX = 6.5            # width of a caption character at 8 pt and DPI (generous)
BORDER_PX = 5
MARK_COLOURS = {"hit": (0, 170, 60), "miss": (220, 30, 30)}
PLACEHOLDER_GREY = (150, 150, 150)
DPI = 100


# ----------------------------------------------------------------------------------------------------
# What to show
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeGroup:
    """One first-level code: every item row under it, and the rows shown (ordered by full semantic ID)."""

    code: int
    rows: np.ndarray
    shown: np.ndarray


def sample_codes(semantic_ids: np.ndarray, n_codes: int, per_code: int, seed: int,
                 order: str = "largest") -> list[CodeGroup]:
    """The first-level codes to show and up to `per_code` items of each.

    semantic_ids: (N, L+1) codes of every item row. order 'largest': the n_codes codes with the most items
    (ties by code); 'random': a seeded sample of the used codes, shown in code order. The items shown of a
    code with more than per_code are a seeded sample, sorted by their full semantic ID.
    """
    if order not in CODE_ORDERS:
        raise ValueError(f"code order {order!r}: use one of {CODE_ORDERS}.")
    if n_codes < 1 or per_code < 1:
        raise ValueError(f"n_codes = {n_codes} and per_code = {per_code} must both be at least 1.")
    rng = np.random.default_rng([seed, 0])
    first = semantic_ids[:, 0]
    used, counts = np.unique(first, return_counts=True)
    if order == "largest":
        chosen = used[np.lexsort((used, -counts))][:n_codes]
    else:
        chosen = np.sort(rng.choice(used, min(n_codes, len(used)), replace=False))
    groups = []
    for code in chosen:
        rows = np.flatnonzero(first == code)
        shown = rows if len(rows) <= per_code else rng.choice(rows, per_code, replace=False)
        codes = semantic_ids[shown]
        shown = shown[np.lexsort(codes.T[::-1])]  # lexsort's last key is the primary one
        groups.append(CodeGroup(code=int(code), rows=rows, shown=shown))
    return groups


def top_genres(genres: pd.Series, rows: np.ndarray, n: int = 3) -> list[tuple[str, int]]:
    """The n most frequent genres of the items at `rows` ('|'-joined items.csv genres), count then name order."""
    counts = Counter(g for text in genres.iloc[rows] for g in str(text).split("|") if g)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def sample_users(n_users: int, n: int, seed: int) -> np.ndarray:
    """A seeded sample of min(n, n_users) user rows, sorted."""
    if n < 0:
        raise ValueError(f"the number of users to show must be at least 0, got {n}.")
    return np.sort(np.random.default_rng([seed, 1]).choice(n_users, min(n, n_users), replace=False))


@dataclass(frozen=True)
class UserExample:
    """A test user as the evaluation sees them (item rows; NO_ITEM where beam search found no item)."""

    user_row: int
    user_id: int
    history: np.ndarray   # the last n_history input items before the test target, oldest first
    target: int
    top: np.ndarray       # (k,) constrained beam search's ranking, best first

    @property
    def hit_rank(self) -> int | None:
        """1-based rank of the target in the top-k, None when it is not there."""
        found = np.flatnonzero(self.top == self.target)
        return int(found[0]) + 1 if len(found) else None


@torch.no_grad()
def rank_test_users(model, data: train_decoder.DecoderData, trie: SemanticIdTrie, user_rows: np.ndarray,
                    beam_width: int, top_k: int, n_history: int) -> list[UserExample]:
    """Each user's leave-one-out test example and TIGER's top_k for it, as train_decoder.evaluate ranks it:
    encoder input `data.encoder_inputs`, constrained beam search with the input's items excluded."""
    model.eval()
    if len(user_rows) == 0:
        return []
    inter = data.interactions
    positions = data.test_pos[user_rows]
    src = torch.as_tensor(data.encoder_inputs(positions))
    ranked = beam_search(model, src, trie, beam_width, top_k, seen=data.seen_items(positions, torch.device("cpu")))
    windows = history_windows(inter.item_index, inter.offsets[user_rows], positions, n_history)
    return [UserExample(user_row=int(u), user_id=int(inter.user_ids[u]), history=window[window != NO_ITEM],
                        target=int(inter.item_index[p]), top=top)
            for u, p, window, top in zip(user_rows, positions, windows, ranked.items.numpy())]


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------

@dataclass
class Tile:
    """One poster slot: the item row (None: no item), its caption and its frame ('hit', 'miss' or None)."""

    row: int | None
    label: str
    mark: str | None = None


@dataclass
class Strip:
    """A captioned row of tiles; `breaks` are the tile indices preceded by a wider gap."""

    title: str
    tiles: list[Tile]
    breaks: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)


class PosterShelf:
    """Posters of one folder as fixed-size tiles, with a tally of the missing and unreadable ones."""

    def __init__(self, folder: Path, movie_ids: np.ndarray, size: tuple[int, int] = TILE_SIZE):
        self.folder, self.movie_ids, self.size = Path(folder), movie_ids, size
        self.status: dict[int, str] = {}  # movieId -> 'ok', 'missing' or 'unreadable'

    def image(self, row: int | None) -> tuple[Image.Image, str]:
        """The tile of item `row` and its status ('ok', 'missing', 'unreadable', or 'no item' for None)."""
        if row is None:
            return placeholder(self.size, "no item"), "no item"
        movie_id = int(self.movie_ids[row])
        path = self.folder / f"{movie_id}.jpg"
        status = "missing"
        tile = None
        if path.is_file():
            try:
                with Image.open(path) as img:
                    img.draft("RGB", (2 * self.size[0], 2 * self.size[1]))  # JPEG: decode at reduced size
                    tile = ImageOps.pad(img.convert("RGB"), self.size, color=PLACEHOLDER_GREY)
                status = "ok"
            except (OSError, ValueError) as err:
                log.warning("%s cannot be read (%s): drawn as a grey tile", path, err)
                status = "unreadable"
        self.status[movie_id] = status
        if tile is None:
            tile = placeholder(self.size, f"{movie_id}\n{status}")
        return tile, status

    def counts(self) -> dict:
        """Posters not drawn: distinct movies without a file, and with an unreadable one."""
        tally = Counter(self.status.values())
        return {"movies_shown": len(self.status), "missing": tally["missing"], "unreadable": tally["unreadable"],
                "missing_movie_ids": sorted(m for m, s in self.status.items() if s == "missing"),
                "unreadable_movie_ids": sorted(m for m, s in self.status.items() if s == "unreadable")}


def placeholder(size: tuple[int, int], text: str) -> Image.Image:
    """A grey tile with `text` in its middle."""
    tile = Image.new("RGB", size, PLACEHOLDER_GREY)
    ImageDraw.Draw(tile).multiline_text((size[0] // 2, size[1] // 2), text, fill=(255, 255, 255), anchor="mm",
                                        align="center")
    return tile


def strip_image(strip: Strip, shelf: PosterShelf) -> tuple[Image.Image, list[int], list[str]]:
    """The strip's posters side by side (frames drawn), the left x of every tile and each tile's poster status."""
    width, height = shelf.size
    xs, x = [], 0
    for index in range(len(strip.tiles)):
        x += SEPARATOR if index in strip.breaks else (GAP if index else 0)
        xs.append(x)
        x += width
    canvas = Image.new("RGB", (max(x, 1), height), (255, 255, 255))
    statuses = []
    for tile, left in zip(strip.tiles, xs):
        image, status = shelf.image(tile.row)
        statuses.append(status)
        if tile.mark is not None:
            image = image.copy()
            ImageDraw.Draw(image).rectangle([0, 0, width - 1, height - 1], outline=MARK_COLOURS[tile.mark],
                                            width=BORDER_PX)
        canvas.paste(image, (left, 0))
    return canvas, xs, statuses


def draw_strips(path: Path, strips: list[Strip], shelf: PosterShelf) -> dict:
    """Write the strips one under the other as a PNG; returns the layout: its pixel size and every strip's
    tiles (item row, movieId, frame, poster status, caption, box [left, top, right, bottom] in PNG pixels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [strip_image(strip, shelf) for strip in strips]
    row_px = TITLE_PX + shelf.size[1] + LABEL_PX
    title_px = [TITLE_CHAR_PX * len(strip.title) for strip in strips]  # so that no caption is cut off
    width_px = int(max([image.width for image, _, _ in drawn] + title_px + [400])) + 2 * MARGIN_PX
    height_px = max(len(strips), 1) * row_px + 2 * MARGIN_PX
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    layout = []
    for index, (strip, (image, xs, statuses)) in enumerate(zip(strips, drawn)):
        top = MARGIN_PX + index * row_px + TITLE_PX
        ax = fig.add_axes((MARGIN_PX / width_px, 1 - (top + shelf.size[1]) / height_px,
                           image.width / width_px, shelf.size[1] / height_px))
        ax.imshow(np.asarray(image), aspect="auto", interpolation="nearest")
        ax.set_axis_off()
        ax.text(0, -4, strip.title, fontsize=8, ha="left", va="bottom")
        for tile, left in zip(strip.tiles, xs):
            ax.text(left + shelf.size[0] / 2, shelf.size[1] + 3, tile.label, fontsize=5, ha="center", va="top",
                    linespacing=1.1)
        layout.append({"title": strip.title, **strip.info,
                       "tiles": [{"row": tile.row, "movie_id": None if tile.row is None else int(shelf.movie_ids[tile.row]),
                                  "mark": tile.mark, "poster": status, "label": tile.label,
                                  "box": [MARGIN_PX + left, top, MARGIN_PX + left + shelf.size[0], top + shelf.size[1]]}
                                 for tile, left, status in zip(strip.tiles, xs, statuses)]})
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return {"file": path.name, "size_px": [width_px, height_px], "strips": layout}


def short_title(title: str, width: int = 15) -> str:
    """A title cut to `width` characters, without its '(YYYY)'."""
    title = str(title)
    if title.endswith(")") and title[-6:-5] == "(" and title[-5:-1].isdigit():
        title = title[:-6].rstrip()
    return title if len(title) <= width else title[:width - 1] + "~"


def code_strips(groups: list[CodeGroup], semantic_ids: np.ndarray, items: pd.DataFrame) -> list[Strip]:
    """One strip per code: its items' posters labelled with title and the rest of their semantic ID."""
    strips = []
    for group in groups:
        genres = top_genres(items["genres"], group.rows)
        share = ", ".join(f"{g} {100 * c / len(group.rows):.0f}%" for g, c in genres) or "no genres"
        title = (f"code {group.code}: {len(group.rows)} items ({len(group.shown)} shown); top genres {share}")
        tiles = [Tile(int(r), f"{short_title(items['title'].iloc[r])}\n"
                              f"{'-'.join(str(c) for c in semantic_ids[r, 1:])}") for r in group.shown]
        strips.append(Strip(title, tiles, info={"code": group.code, "n_items": len(group.rows),
                                                "top_genres": [[g, c] for g, c in genres]}))
    return strips


def user_strips(examples: list[UserExample], semantic_ids: np.ndarray, items: pd.DataFrame) -> list[Strip]:
    """One strip per user: input history, then the target (framed hit / miss), then the top-k (the hit framed)."""
    titles = items["title"]
    strips = []
    for ex in examples:
        rank = ex.hit_rank
        history = [Tile(int(r), f"-{len(ex.history) - i}  {short_title(titles.iloc[r])}")
                   for i, r in enumerate(ex.history)]
        target = Tile(ex.target, f"target\n{short_title(titles.iloc[ex.target])}", "miss" if rank is None else "hit")
        top = [Tile(None if r == NO_ITEM else int(r),
                    f"#{i + 1} " + ("no item" if r == NO_ITEM else
                                    f"{short_title(titles.iloc[r], 12)}\ncode {'-'.join(map(str, semantic_ids[r]))}"),
                    "hit" if r == ex.target else None) for i, r in enumerate(ex.top)]
        verdict = f"hit at rank {rank}" if rank else f"not in the top {len(ex.top)}"
        title = (f"user {ex.user_id}: last {len(history)} inputs | target {titles.iloc[ex.target]} | "
                 f"TIGER top {len(ex.top)}: {verdict}")
        strips.append(Strip(title, history + [target] + top, breaks=(len(history), len(history) + 1),
                            info={"user_id": ex.user_id, "user_row": ex.user_row, "hit_rank": rank,
                                  "n_history": len(history), "target_tile": len(history)}))
    return strips


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------

def load_decoder(decoder_dir: Path, run: Path, rqvae_dir: Path):
    """The best checkpoint of a train_decoder.py folder trained on `run`, its data, beam width, top_k and
    whether it uses random IDs (its semantic IDs checked as current, against `rqvae_dir` where its recorded
    folder does not resolve)."""
    from experiments.decoder_diagnostics import gin_value, load_trained
    try:
        model, data, trained_run = load_trained(decoder_dir)
        beam_width, top_k = gin_value("train_decoder.beam_width"), gin_value("train_decoder.top_k")
    finally:
        gin.clear_config()
    if Path(trained_run).resolve() != run.resolve():
        raise artifacts.ArtifactError(f"{decoder_dir} was trained on the run folder {trained_run}, not {run}: "
                                      "pass --decoder with a decoder of this run.")
    metrics = artifacts.load_json(decoder_dir / train_decoder.METRICS_FILE, "train_decoder.py")
    check_result_is_current(metrics, decoder_dir / train_decoder.METRICS_FILE, run, rqvae_dir)
    return model, data, int(beam_width), int(top_k), metrics.get("semantic_ids") == "random"


def make_gallery(run: str | Path, posters: str | Path, out: str | Path | None = None,
                 decoder: str | Path | None = None, n_codes: int = 12, per_code: int = 16, n_users: int = 8,
                 code_order: str = "largest", n_history: int = 10, seed: int = 0,
                 beam_width: int | None = None, rqvae: str | Path | None = None) -> dict:
    """Write codes.png, users.png (when n_users > 0), gallery.md and gallery.json into OUT; returns the json.

    decoder: a train_decoder.py folder (default RUN/decoder). beam_width: default the decoder's own.
    rqvae: the train_rqvae.py folder whose codes the code strips show (default RUN/rqvae); with users, it
    must hold the semantic IDs the decoder was trained on, so that both images show one set of codes.
    """
    run = Path(run)
    out = Path(out) if out else run / "gallery"
    posters = Path(posters)
    if not posters.is_dir():
        raise artifacts.ArtifactError(f"no poster folder at {posters}: pass --posters <folder of {{movieId}}.jpg> "
                                      "(experiments/03_download_posters.py writes one).")
    items = artifacts.load_items(run)
    movie_ids = items["movieId"].to_numpy()
    rqvae_dir = Path(rqvae) if rqvae else run / "rqvae"
    semantic_ids, _ = train_decoder.load_semantic_ids(run, rqvae_dir, None, False, 0)
    decoder_dir = Path(decoder) if decoder else run / "decoder"
    if n_users:  # checked before anything is drawn, so that a refused gallery leaves no new image
        model, data, run_beam, top_k, random_ids = load_decoder(decoder_dir, run, rqvae_dir)
        if not np.array_equal(data.semantic_ids, semantic_ids):
            fix = ("it uses random IDs (--random-ids), whose codes are no RQ-VAE's: pass a decoder trained on "
                   "semantic IDs" if random_ids else f"pass --rqvae with the folder it was trained on "
                   f"('semantic_ids' in its {train_decoder.METRICS_FILE})")
            raise artifacts.ArtifactError(f"{decoder_dir} was trained on other semantic IDs than {rqvae_dir} holds: "
                                          f"{fix}, so that the code and user images show the same codes.")
    shelf = PosterShelf(posters, movie_ids)
    groups = sample_codes(semantic_ids, n_codes, per_code, seed, code_order)
    report = {"run": str(run), "rqvae": str(rqvae_dir), "posters": str(posters), "seed": seed, "code_order": code_order,
              "codes": draw_strips(out / "codes.png", code_strips(groups, semantic_ids, items), shelf)}
    log.info("codes.png: %d codes", len(groups))
    if n_users:
        beam_width = beam_width or run_beam
        trie = SemanticIdTrie(torch.as_tensor(data.semantic_ids), data.vocab.codebook_sizes)
        examples = rank_test_users(model, data, trie, sample_users(data.interactions.n_users, n_users, seed),
                                   beam_width, top_k, n_history)
        report["decoder"] = {"folder": str(decoder_dir), "beam_width": beam_width, "top_k": top_k,
                             "max_history": data.max_history, "n_history": n_history}
        report["users"] = draw_strips(out / "users.png", user_strips(examples, data.semantic_ids, items), shelf)
        log.info("users.png: %d users, %d hits", len(examples), sum(e.hit_rank is not None for e in examples))
    report["posters_not_drawn"] = shelf.counts()
    artifacts.save_json(out / "gallery.json", report)
    artifacts.save_text(out / "gallery.md", gallery_markdown(report))
    return report


def gallery_markdown(report: dict) -> str:
    """The index: links to the PNGs, one table per gallery, the missing-poster count."""
    counts = report["posters_not_drawn"]
    lines = [f"# Poster gallery of {report['run']}", "",
             f"Posters from {report['posters']}; seed {report['seed']}. Of the {counts['movies_shown']} movies shown, "
             f"{counts['missing']} have no poster file and {counts['unreadable']} an unreadable one "
             "(grey tiles with their movieId).", "",
             f"## First-level codes ({report['code_order']} {len(report['codes']['strips'])})", "",
             "[codes.png](codes.png)", "", "![codes](codes.png)", "",
             "| code | items | shown | top genres (count) |", "|---:|---:|---:|---|"]
    lines += [f"| {s['code']} | {s['n_items']} | {len(s['tiles'])} | "
              + ", ".join(f"{g} ({c})" for g, c in s["top_genres"]) + " |" for s in report["codes"]["strips"]]
    if "users" in report:
        dec = report["decoder"]
        lines += ["", f"## TIGER's top {dec['top_k']} for test users", "",
                  f"Decoder {dec['folder']}: constrained beam search (width {dec['beam_width']}) over the full "
                  f"catalogue, the input's items excluded, as in its evaluation. Each strip shows the last "
                  f"{dec['n_history']} events before the leave-one-out test target (the encoder reads the last "
                  f"{dec['max_history']}), the target (green frame: in the top {dec['top_k']}; red: not), then the "
                  "ranking.", "", "[users.png](users.png)", "", "![users](users.png)", "",
                  "| user | inputs shown | target (movieId) | hit rank |", "|---:|---:|---|---:|"]
        for s in report["users"]["strips"]:
            target = s["tiles"][s["target_tile"]]
            lines.append(f"| {s['user_id']} | {s['n_history']} | {target['movie_id']} | {s['hit_rank'] or '-'} |")
        hits = sum(s["hit_rank"] is not None for s in report["users"]["strips"])
        lines += ["", f"{hits} of {len(report['users']['strips'])} targets in the top {dec['top_k']}."]
    if counts["missing"] or counts["unreadable"]:
        lines += ["", "Movies without a drawable poster: "
                  + ", ".join(map(str, counts["missing_movie_ids"] + counts["unreadable_movie_ids"])) + "."]
    return "\n".join(lines + [""])
