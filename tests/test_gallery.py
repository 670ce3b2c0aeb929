"""Step 12, the poster gallery, on a tiny demo run with a tiny trained TIGER and some posters missing."""
import importlib.util
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_decoder
from experiments import artifacts, gallery
from experiments.decoder_diagnostics import load_trained
from modules.beam_search import SemanticIdTrie, beam_search
from modules.metrics import NO_ITEM
from modules.semantic_ids import add_collision_column, codebook_sizes
from tests.test_train_decoder import run_train

REPO = Path(__file__).resolve().parents[1]
N_CODES, PER_CODE, N_USERS = 5, 6, 8
DECODER = "train_decoder.dataset = 'demo'\ntrain_decoder.max_history = 12\ntrain_decoder.iterations = 6\n"
MISSING, BROKEN = 5, 1  # posters deleted, posters overwritten with bytes that are no image


@pytest.fixture(scope="module")
def finished_run(tiny_demo_run, tiny_demo_data, tmp_path_factory):
    """A run as `make pipeline` leaves it (items.csv, item_ids.npy, interactions.npz, rqvae/, decoder/), with
    hand-made uneven semantic IDs (codes 0..6, first code 0 the most common), and a poster folder in which
    MISSING posters are gone and BROKEN are not images."""
    root = tmp_path_factory.mktemp("gallery")
    run = root / "run"
    run.mkdir()
    for name in ("items.csv", "item_ids.npy", "interactions.npz", "stats.json"):
        shutil.copy(tiny_demo_run / name, run / name)
    item_ids = np.load(run / "item_ids.npy")
    rng = np.random.default_rng(5)
    first = np.minimum(rng.geometric(0.3, len(item_ids)) - 1, 6)
    semantic_ids = add_collision_column(np.stack([first, rng.integers(0, 3, len(item_ids))], 1))
    artifacts.save_npy(run / "rqvae" / "semantic_ids.npy", semantic_ids)
    artifacts.save_npy(run / "rqvae" / "movie_ids.npy", item_ids)
    artifacts.save_json(run / "rqvae" / "semantic_ids.json", {"codebook_sizes": codebook_sizes(semantic_ids, 7)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(run, run / "decoder", DECODER)
    finally:
        torch.set_num_threads(threads)
    posters = root / "posters"
    shutil.copytree(tiny_demo_data / "posters", posters)
    files = sorted(posters.glob("*.jpg"), key=lambda p: int(p.stem))
    for path in files[:MISSING]:
        path.unlink()
    for path in files[MISSING:MISSING + BROKEN]:
        path.write_bytes(b"not a jpeg")
    return run, posters, semantic_ids


@pytest.fixture(scope="module")
def report(finished_run):
    run, posters, _ = finished_run
    return gallery.make_gallery(run, posters, n_codes=N_CODES, per_code=PER_CODE, n_users=N_USERS, seed=1)


def test_items_under_a_code_have_that_first_code_and_the_caption_counts_them(finished_run, report):
    run, _, semantic_ids = finished_run
    items = artifacts.load_items(run)
    strips = report["codes"]["strips"]
    counts = Counter(semantic_ids[:, 0].tolist())
    largest = [code for code, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:N_CODES]]
    assert [s["code"] for s in strips] == largest
    for strip in strips:
        rows = [t["row"] for t in strip["tiles"]]
        assert (semantic_ids[rows, 0] == strip["code"]).all()
        assert strip["n_items"] == counts[strip["code"]] and len(rows) == min(PER_CODE, counts[strip["code"]])
        assert len(set(rows)) == len(rows)
        assert [tuple(c) for c in semantic_ids[rows]] == sorted(tuple(c) for c in semantic_ids[rows])
        genres = Counter(g for text in items["genres"][semantic_ids[:, 0] == strip["code"]] for g in text.split("|"))
        assert [c for _, c in strip["top_genres"]] == sorted(genres.values(), reverse=True)[:3]
        assert all(genres[g] == c for g, c in strip["top_genres"])
        assert f"code {strip['code']}: {strip['n_items']} items" in strip["title"]


def test_code_samples_are_seeded_and_random_order_draws_from_the_used_codes(finished_run):
    _, _, semantic_ids = finished_run
    pick = lambda seed: [(g.code, g.shown.tolist()) for g in gallery.sample_codes(semantic_ids, 3, 4, seed, "random")]
    assert pick(0) == pick(0)
    assert len({tuple(c for c, _ in pick(s)) for s in range(6)}) > 1  # the seed changes the codes drawn
    for code, shown in pick(2):
        assert (semantic_ids[shown, 0] == code).all() and len(shown) == min(4, (semantic_ids[:, 0] == code).sum())
    with pytest.raises(ValueError, match="code order 'biggest'"):
        gallery.sample_codes(semantic_ids, 3, 4, 0, "biggest")


def test_each_user_shows_the_test_input_and_the_ranking_the_evaluation_makes(finished_run, report):
    run, _, _ = finished_run
    model, data, _ = load_trained(run / "decoder")
    inter = data.interactions
    strips = report["users"]["strips"]
    assert len(strips) == N_USERS and report["decoder"]["top_k"] == 10
    user_rows = np.array([s["user_row"] for s in strips])
    trie = SemanticIdTrie(torch.as_tensor(data.semantic_ids), data.vocab.codebook_sizes)
    # Every test user in one batch: the sampled users' rows of it must be what the gallery shows.
    everyone = beam_search(model, torch.as_tensor(data.encoder_inputs(data.test_pos)), trie,
                           report["decoder"]["beam_width"], 10,
                           seen=data.seen_items(data.test_pos, torch.device("cpu"))).items.numpy()
    for strip in strips:
        events = inter.history(strip["user_row"])  # leave-one-out: the last event is the test target
        assert inter.user_ids[strip["user_row"]] == strip["user_id"]
        rows = [t["row"] for t in strip["tiles"]]
        n = strip["n_history"]
        assert n == min(10, len(events) - 1)
        assert rows[:n] == events[:-1][-10:].tolist()
        assert rows[n] == events[-1] and strip["target_tile"] == n
        shown_top = [NO_ITEM if r is None else r for r in rows[n + 1:]]
        assert shown_top == everyone[strip["user_row"]].tolist()
        assert not set(shown_top) & set(events[:-1].tolist())  # the input's items are excluded
    # train_decoder.evaluate on the same users agrees with the hit ranks shown.
    ranks = np.array([s["hit_rank"] or 0 for s in strips])
    metrics = train_decoder.evaluate(model, data, trie, data.test_pos[user_rows], train_decoder.Runtime(torch.device("cpu")),
                                     report["decoder"]["beam_width"], 10, 3, "test")
    assert metrics["recall@10"] == pytest.approx((ranks > 0).mean())
    assert metrics["ndcg@10"] == pytest.approx(np.where(ranks > 0, 1 / np.log2(np.maximum(ranks, 1) + 1), 0).mean())


def test_the_hit_frame_is_on_the_target_exactly_when_it_is_in_the_top_k(finished_run, report):
    run, posters, semantic_ids = finished_run
    items = artifacts.load_items(run)
    made_up = [gallery.UserExample(0, 11, np.array([1, 2, 3]), target=4, top=np.array([9, 4, 8])),
               gallery.UserExample(1, 12, np.array([1]), target=5, top=np.array([9, 4, NO_ITEM]))]
    strips = gallery.user_strips(made_up, semantic_ids, items)
    assert [t.mark for t in strips[0].tiles] == [None] * 3 + ["hit", None, "hit", None]
    assert [t.mark for t in strips[1].tiles] == [None, "miss", None, None, None]
    assert strips[1].tiles[-1].row is None and "hit at rank 2" in strips[0].title
    for strip in report["users"]["strips"]:
        tiles, n = strip["tiles"], strip["n_history"]
        target, top = tiles[n], tiles[n + 1:]
        assert all(t["mark"] is None for t in tiles[:n])
        assert [t["mark"] == "hit" for t in top] == [t["row"] == target["row"] for t in top]
        hit = strip["hit_rank"] is not None
        assert target["mark"] == ("hit" if hit else "miss")
        assert hit == (target["row"] in [t["row"] for t in top])
        if hit:
            assert top[strip["hit_rank"] - 1]["row"] == target["row"]
    # The frames are in the PNG: the middle of a framed tile's left border has the frame's colour.
    png = np.asarray(Image.open(run / "gallery" / "users.png").convert("RGB")).astype(int)
    framed = [t for s in report["users"]["strips"] for t in s["tiles"] if t["mark"]]
    assert framed
    for tile in framed:
        left, top_px, _, bottom = tile["box"]
        pixel = png[(top_px + bottom) // 2, left + gallery.BORDER_PX // 2]
        assert np.abs(pixel - gallery.MARK_COLOURS[tile["mark"]]).max() < 40, (tile, pixel)


def test_missing_and_unreadable_posters_are_grey_tiles_and_counted(finished_run, report):
    run, posters, _ = finished_run
    tiles = [t for part in ("codes", "users") for s in report[part]["strips"] for t in s["tiles"] if t["row"] is not None]
    shown = {t["movie_id"] for t in tiles}
    absent = {m for m in shown if not (posters / f"{m}.jpg").is_file()}
    broken = {m for m in shown if (posters / f"{m}.jpg").is_file() and (posters / f"{m}.jpg").read_bytes() == b"not a jpeg"}
    counts = report["posters_not_drawn"]
    assert counts["movies_shown"] == len(shown)
    assert set(counts["missing_movie_ids"]) == absent and counts["missing"] == len(absent)
    assert set(counts["unreadable_movie_ids"]) == broken and counts["unreadable"] == len(broken)
    assert all(t["poster"] == ("missing" if t["movie_id"] in absent else "unreadable" if t["movie_id"] in broken
                               else "ok") for t in tiles)
    assert absent or broken, "the fixture should put a poster-less movie on show"
    text = (run / "gallery" / "gallery.md").read_text()
    assert f"{len(absent)} have no poster file and {len(broken)} an unreadable one" in text
    shelf = gallery.PosterShelf(posters, np.array([-7]))
    grey, status = shelf.image(0)
    assert status == "missing" and grey.size == gallery.TILE_SIZE and shelf.counts()["missing_movie_ids"] == [-7]


def test_pngs_decode_with_the_layouts_size_and_the_index_links_them(finished_run, report):
    run, _, _ = finished_run
    out = run / "gallery"
    for part, n_strips in (("codes", N_CODES), ("users", N_USERS)):
        layout = report[part]
        with Image.open(out / layout["file"]) as png:
            png.load()
            assert list(png.size) == layout["size_px"]
        assert len(layout["strips"]) == n_strips
        for strip in layout["strips"]:
            boxes = [t["box"] for t in strip["tiles"]]
            assert all(r - l == gallery.TILE_SIZE[0] and b - t == gallery.TILE_SIZE[1] for l, t, r, b in boxes)
            assert all(b[0] >= a[2] for a, b in zip(boxes, boxes[1:]))  # left to right, no overlap
            assert max(b[2] for b in boxes) <= layout["size_px"][0] and boxes[0][3] <= layout["size_px"][1]
    users = report["users"]["strips"]
    assert all(len(s["tiles"]) == s["n_history"] + 1 + 10 for s in users)
    text = (out / "gallery.md").read_text()
    assert "](codes.png)" in text and "](users.png)" in text
    assert artifacts.load_json(out / "gallery.json", "12_gallery.py") == __import__("json").loads(
        __import__("json").dumps(report))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_cli_without_users_needs_no_decoder_and_bad_inputs_say_what_to_do(finished_run, tmp_path):
    run, posters, _ = finished_run
    spec = importlib.util.spec_from_file_location("gallery_script", REPO / "experiments" / "12_gallery.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--run", str(run), "--posters", str(posters), "--out", str(tmp_path / "g"),
                          "--users", "0", "--codes", "2", "--decoder", str(tmp_path / "absent")])
    assert "users" not in result and len(result["codes"]["strips"]) == 2
    assert (tmp_path / "g" / "codes.png").is_file() and not (tmp_path / "g" / "users.png").exists()
    with pytest.raises(SystemExit, match=r"absent/config.gin is missing: run train_decoder.py"):
        script.main(["--run", str(run), "--posters", str(posters), "--out", str(tmp_path / "g"), "--users", "2",
                     "--decoder", str(tmp_path / "absent")])
    with pytest.raises(SystemExit, match="no poster folder at"):
        script.main(["--run", str(run), "--posters", str(tmp_path / "none")])


def test_codes_come_from_the_rqvae_folder_given_and_must_match_the_decoders(finished_run, tmp_path):
    run, posters, semantic_ids = finished_run
    other = tmp_path / "rqvae_other"
    shifted = semantic_ids.copy()
    shifted[:, 0] = (shifted[:, 0] + 1) % 7        # another set of codes for the same items
    artifacts.save_npy(other / "semantic_ids.npy", shifted)
    artifacts.save_npy(other / "movie_ids.npy", np.load(run / "item_ids.npy"))
    artifacts.save_json(other / "semantic_ids.json", {"codebook_sizes": codebook_sizes(shifted, 7)})
    report = gallery.make_gallery(run, posters, tmp_path / "g", n_codes=2, per_code=3, n_users=0, rqvae=other)
    assert report["rqvae"] == str(other)
    largest = Counter(shifted[:, 0].tolist()).most_common(1)[0][0]
    assert report["codes"]["strips"][0]["code"] == largest != Counter(semantic_ids[:, 0].tolist()).most_common(1)[0][0]
    for strip in report["codes"]["strips"]:       # each shown item's first code is the strip's, in `other`
        rows = [t["row"] for t in strip["tiles"]]
        assert (shifted[rows, 0] == strip["code"]).all()
    with pytest.raises(artifacts.ArtifactError, match=r"trained on other semantic IDs than .*rqvae_other.*--rqvae"):
        gallery.make_gallery(run, posters, tmp_path / "g2", n_codes=2, per_code=3, n_users=2, rqvae=other)
    assert not (tmp_path / "g2").exists()          # refused before anything was drawn


def test_a_random_id_decoder_is_refused_with_its_own_reason(finished_run, tmp_path):
    run, posters, _ = finished_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(run, tmp_path / "decoder_random", DECODER + "train_decoder.random_ids = True\n")  # as --random-ids binds it
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(artifacts.ArtifactError, match=r"it uses random IDs \(--random-ids\).*trained on semantic IDs"):
        gallery.make_gallery(run, posters, tmp_path / "g", decoder=tmp_path / "decoder_random", n_users=2)
