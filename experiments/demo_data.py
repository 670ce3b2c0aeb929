"""A small synthetic MovieLens-25M-format dataset with posters and planted structure.

The generator is the project's embedded default: `make demo` runs the whole pipeline on it offline.

Planted structure (all deterministic from `seed`):
- Every item belongs to one of `n_groups` latent groups (default 8). Users prefer a few groups and
  watch in sessions, each session drawn from one preferred group, so the group of a user's recent
  items predicts the group of the next one.
- Genres, tags and the tag genome reveal only the group's *family* (group // 2): two groups share
  one family, so metadata alone leaves a two-way ambiguity.
- The poster's visual style (dominant colour and layout) reveals only the group's *style*
  (group % 4), shared by groups g and g + 4.
- Metadata and posters together identify the group exactly. So poster features carry signal that
  metadata lacks, and a model with both should beat one with metadata only.
- TMDB details (tmdb/details.jsonl) carry part of the group: for a share `text_signal_frac` of the movies
  with a record, the overview, tagline, keywords, cast and director use words and people of the movie's
  own group (overview words and cast always, the others sometimes); the other movies get neutral words and
  people, half of them one decoy theme word of a random group. A share `missing_details_frac` of the
  movies with a tmdbId has no record, and a few records are empty (no text at all). Popularity and votes
  are random: they carry nothing (and the pipeline never reads them).

Files written, in exactly the ML-25M format and CRLF line endings: movies.csv, ratings.csv, links.csv,
tags.csv, genome-scores.csv, genome-tags.csv, posters/{movieId}.jpg, tmdb/details.jsonl (the shape of the TMDB
download step: {"movieId", "tmdbId", "response"} a line, LF endings), plus demo_truth.csv (the latent group of
each movie, for analysis only; no pipeline step reads it).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

CONFIG_FILE = "demo_config.json"

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
# Style s = group % 4 -> (base RGB colour, layout). Colours far apart so any CNN separates them.
STYLES = [((200, 40, 40), "bands"), ((40, 70, 200), "circle"), ((40, 170, 60), "stripes"),
          ((230, 200, 40), "diagonal")]
WORDS = ["Night", "River", "Last", "Silent", "Golden", "Broken", "Secret", "Winter", "Lost", "Iron", "Paper",
         "Burning", "Hidden", "Empty", "Wild", "Glass", "Little", "Dark", "Summer", "Distant"]
NOUNS = ["Road", "City", "Heart", "Kingdom", "Garden", "Machine", "Promise", "Shadow", "Harbor", "Letter",
         "Mountain", "Island", "Dream", "Station", "Empire", "Circus", "Voyage", "Signal", "Orchard", "Echo"]


@dataclass(frozen=True)
class DemoConfig:
    """Size and structure of the synthetic dataset."""

    n_items: int = 800
    n_users: int = 1500
    n_groups: int = 8
    seed: int = 0
    min_history: int = 8
    max_history: int = 60
    in_group_prob: float = 0.9       # chance that a session item comes from the session's group
    session_length: tuple = (4, 10)
    poster_size: tuple = (120, 180)  # width, height: portrait like real posters
    missing_poster_frac: float = 0.03
    missing_tmdb_frac: float = 0.01
    n_genome_tags: int = 24
    missing_details_frac: float = 0.08   # movies with a tmdbId but no TMDB details record
    empty_details_frac: float = 0.02     # records with no overview, tagline, cast, crew or keywords
    text_signal_frac: float = 0.6        # records whose words and people name the movie's group

    def __post_init__(self):
        if self.n_groups % 4 or self.n_groups < 4:
            raise ValueError(f"n_groups={self.n_groups}: must be a multiple of 4 (4 poster styles x families).")
        if self.n_items < 2 * self.n_groups:
            raise ValueError(f"n_items={self.n_items} is too small for {self.n_groups} groups.")


def make_demo_dataset(out_dir: str | Path, config: DemoConfig = DemoConfig(), overwrite: bool = False) -> Path:
    """Write the dataset into `out_dir` (built in a temp folder, then renamed: never half-written)."""
    out_dir = Path(out_dir)
    wanted = json.dumps(asdict(config), sort_keys=True)
    if out_dir.exists() and not overwrite:
        marker = out_dir / CONFIG_FILE
        if marker.is_file() and marker.read_text() == wanted:
            log.info("%s already holds this demo dataset: skipping (use --overwrite to regenerate).", out_dir)
            return out_dir
        raise FileExistsError(f"{out_dir} exists but was not made by this generator with these settings "
                              f"({marker} differs or is missing): pass --overwrite or choose another folder.")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_all(tmp, config)
        (tmp / CONFIG_FILE).write_text(wanted)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_all(folder: Path, cfg: DemoConfig) -> None:
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_items
    # Sparse, unsorted-looking ids like the real ones (gaps, a few six-digit ids).
    movie_ids = np.sort(rng.choice(np.arange(1, 5 * n), size=n, replace=False))
    movie_ids[-max(1, n // 50):] += 100_000
    group = rng.integers(0, cfg.n_groups, size=n)
    family = group // 2
    year = rng.integers(1930, 2020, size=n)

    titles = _write_movies(folder, rng, movie_ids, family, year, cfg)
    tmdb_ids = _write_links(folder, rng, movie_ids, cfg)
    _write_genome(folder, rng, movie_ids, family, cfg)
    n_events = _write_ratings_and_tags(folder, rng, movie_ids, group, family, cfg)
    n_posters = _write_posters(folder / "posters", rng, movie_ids, group, cfg)
    _write_csv(folder / "demo_truth.csv", ["movieId", "group", "family", "style"],
               zip(movie_ids, group, family, group % 4))
    # Its own random stream, drawn last: the files above are byte for byte those of a generator without it.
    n_details = _write_tmdb_details(folder / "tmdb", np.random.default_rng([cfg.seed, 13]), movie_ids, tmdb_ids,
                                    titles, group, year, cfg)
    log.info("demo dataset: %d movies, %d users, %d ratings, %d posters, %d TMDB details", n, cfg.n_users,
             n_events, n_posters, n_details)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")  # GroupLens ships CRLF
        writer.writerow(header)
        writer.writerows(rows)


def _family_genres(n_families: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each family gets its own 3 characteristic genres (distinct across families)."""
    order = rng.permutation(len(GENRES))
    return [order[3 * f:3 * f + 3] for f in range(n_families)]


def _write_movies(folder: Path, rng, movie_ids, family, year, cfg: DemoConfig) -> list[str]:
    """movies.csv; returns each movie's title without its year (as TMDB spells it)."""
    family_genres = _family_genres(cfg.n_groups // 2, rng)
    rows, titles = [], []
    for i, mid in enumerate(movie_ids):
        core = family_genres[family[i]]
        chosen = set(core[rng.random(3) < 0.7]) or {core[0]}
        if rng.random() < 0.15:                      # a little genre noise
            chosen.add(int(rng.integers(len(GENRES))))
        genres = "|".join(sorted(GENRES[g] for g in chosen))
        title = f"{WORDS[rng.integers(len(WORDS))]} {NOUNS[rng.integers(len(NOUNS))]}"
        if i % 37 == 0:
            title = f"{title}, The"                  # comma: exercises CSV quoting, as in real MovieLens
        if i % 53 == 0:
            title = f'{title} "Redux"'
        titles.append(title)
        rows.append((mid, title if i % 97 == 5 else f"{title} ({year[i]})", genres))
    if len(rows) > 3:
        rows[3] = (rows[3][0], rows[3][1], "(no genres listed)")
    _write_csv(folder / "movies.csv", ["movieId", "title", "genres"], rows)
    return titles


def _write_links(folder: Path, rng, movie_ids, cfg: DemoConfig) -> np.ndarray:
    """links.csv; returns each movie's tmdbId (-1 where links.csv has none)."""
    tmdb = rng.choice(np.arange(10, 900_000), size=len(movie_ids), replace=False)
    rows, written = [], []
    for mid, t in zip(movie_ids, tmdb):
        has_tmdb = rng.random() >= cfg.missing_tmdb_frac
        rows.append((mid, f"{int(rng.integers(1, 9_999_999)):07d}", int(t) if has_tmdb else ""))
        written.append(int(t) if has_tmdb else -1)
    _write_csv(folder / "links.csv", ["movieId", "imdbId", "tmdbId"], rows)
    return np.array(written, dtype=np.int64)


def _write_genome(folder: Path, rng, movie_ids, family, cfg: DemoConfig) -> None:
    """A tag genome for ~70% of movies, whose relevance profile depends on the family."""
    n_tags, n_families = cfg.n_genome_tags, cfg.n_groups // 2
    _write_csv(folder / "genome-tags.csv", ["tagId", "tag"], [(t + 1, f"tag {t + 1}") for t in range(n_tags)])
    profile = rng.random((n_families, n_tags)) ** 3
    with_genome = np.flatnonzero(rng.random(len(movie_ids)) < 0.7)
    rows = []
    for i in with_genome:
        relevance = np.clip(profile[family[i]] + rng.normal(0, 0.08, n_tags), 0.0, 1.0)
        rows.extend((movie_ids[i], t + 1, f"{r:.5f}") for t, r in enumerate(relevance))
    _write_csv(folder / "genome-scores.csv", ["movieId", "tagId", "relevance"], rows)


def _write_ratings_and_tags(folder: Path, rng, movie_ids, group, family, cfg: DemoConfig) -> int:
    n = len(movie_ids)
    members = [np.flatnonzero(group == g) for g in range(cfg.n_groups)]
    # Zipf-like popularity inside each group.
    popularity = [1.0 / np.arange(1, len(m) + 1) ** 0.8 for m in members]
    popularity = [p / p.sum() for p in popularity]
    for m in members:
        rng.shuffle(m)
    tag_words = [[f"{w.lower()}-{f}" for w in WORDS[:5]] for f in range(cfg.n_groups // 2)]
    ratings, tags = [], []
    for user in range(1, cfg.n_users + 1):
        liked = rng.choice(cfg.n_groups, size=int(rng.integers(1, 4)), replace=False)
        length = int(rng.integers(cfg.min_history, cfg.max_history + 1))
        seen: set[int] = set()
        sequence: list[int] = []
        while len(sequence) < length and len(seen) < n:
            g = int(rng.choice(liked))
            for _ in range(int(rng.integers(*cfg.session_length))):
                if rng.random() < cfg.in_group_prob:
                    item = int(members[g][rng.choice(len(members[g]), p=popularity[g])])
                else:
                    item = int(rng.integers(n))
                if item not in seen:
                    seen.add(item)
                    sequence.append(item)
        t = int(rng.integers(946_684_800, 1_500_000_000))
        for item in sequence[:length]:
            t += int(rng.choice([0, 1, 30, 600, 86_400], p=[0.1, 0.2, 0.3, 0.3, 0.1]))  # some same-second ties
            liked_item = group[item] in liked
            stars = np.clip(rng.normal(4.0 if liked_item else 2.5, 0.8), 0.5, 5.0)
            ratings.append((user, movie_ids[item], f"{round(stars * 2) / 2:.1f}", t))
            if rng.random() < 0.05:
                tags.append((user, movie_ids[item], str(rng.choice(tag_words[family[item]])), t))
    _write_csv(folder / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings)
    _write_csv(folder / "tags.csv", ["userId", "movieId", "tag", "timestamp"], tags)
    return len(ratings)


def poster_image(style: int, rng: np.random.Generator, size=(120, 180)) -> Image.Image:
    """A synthetic poster: the style's colour and layout, jittered, with random 'text' blocks."""
    (r, g, b), layout = STYLES[style]
    w, h = size
    jitter = rng.integers(-25, 26, size=3)
    base = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip((r, g, b), jitter))
    dark = tuple(int(c * 0.35) for c in base)
    img = Image.new("RGB", size, dark)
    draw = ImageDraw.Draw(img)
    if layout == "bands":
        for y in range(0, h, 30):
            draw.rectangle([0, y, w, y + 14], fill=base)
    elif layout == "circle":
        cx, cy, rad = w // 2 + int(rng.integers(-10, 11)), h // 2 + int(rng.integers(-15, 16)), w // 3
        draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=base)
    elif layout == "stripes":
        for x in range(0, w, 24):
            draw.rectangle([x, 0, x + 11, h], fill=base)
    else:
        for k in range(-h, w, 28):
            draw.polygon([(k, h), (k + 14, h), (k + 14 + h, 0), (k + h, 0)], fill=base)
    for _ in range(int(rng.integers(2, 5))):          # title/credit blocks: item-level noise
        x0, y0 = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 12))
        shade = int(rng.integers(180, 256))
        draw.rectangle([x0, y0, x0 + int(rng.integers(20, 60)), y0 + int(rng.integers(4, 12))],
                       fill=(shade, shade, shade))
    noise = rng.normal(0, 12, (h, w, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _write_posters(folder: Path, rng, movie_ids, group, cfg: DemoConfig) -> int:
    folder.mkdir(parents=True)
    written = 0
    for i, mid in enumerate(movie_ids):
        if rng.random() < cfg.missing_poster_frac:
            continue
        img = poster_image(int(group[i] % 4), rng, cfg.poster_size)
        if i % 41 == 0:
            img = img.convert("L")                          # some grayscale posters, as in the real data
        if i % 29 == 0:
            img = img.resize((cfg.poster_size[0] + 37, cfg.poster_size[1] + 11))  # odd sizes too
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=85)
        (folder / f"{mid}.jpg").write_bytes(buffer.getvalue())
        written += 1
    return written


# ----------------------------------------------------------------------------------------------------
# TMDB details: words and people tied to the latent group for part of the movies
# ----------------------------------------------------------------------------------------------------

# Words of group g's TMDB text (groups beyond eight reuse a theme with the group number appended).
THEMES = [("pirate", "treasure", "galleon", "captain", "cutlass", "lagoon"),
          ("robot", "android", "laser", "starship", "galaxy", "cyborg"),
          ("detective", "murder", "clue", "suspect", "alibi", "inspector"),
          ("vampire", "ghost", "haunted", "curse", "crypt", "werewolf"),
          ("cowboy", "sheriff", "outlaw", "saloon", "ranch", "frontier"),
          ("wedding", "romance", "bride", "lovers", "proposal", "kiss"),
          ("soldier", "battle", "trench", "platoon", "general", "bombing"),
          ("dragon", "wizard", "sorcerer", "elf", "quest", "enchanted")]
NEUTRAL_WORDS = ["family", "friends", "town", "journey", "years", "life", "story", "truth", "past", "chance",
                 "home", "world", "choice", "days", "father", "mother", "brother", "sister", "stranger",
                 "neighbour", "job", "money", "school", "car", "morning", "weekend", "phone", "house"]
FIRST_NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kara",
               "Leo", "Maya", "Nils", "Olga", "Paul"]
LAST_NAMES = ["Abbott", "Brandt", "Castillo", "Dumont", "Eriksen", "Fischer", "Garnier", "Holm", "Ivanova",
              "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov"]
CREW_JOBS = (("Producer", "Production"), ("Screenplay", "Writing"), ("Original Music Composer", "Sound"))
ACTORS_PER_GROUP, NEUTRAL_ACTORS, NEUTRAL_DIRECTORS = 4, 60, 10


def _theme(group: int) -> tuple[str, ...]:
    base = THEMES[group % len(THEMES)]
    return base if group < len(THEMES) else tuple(f"{word}{group}" for word in base)


def _people(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct made-up names in a seeded order (numbered once the 256 first x last pairs run out)."""
    pairs = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    names = [pairs[i] for i in rng.permutation(len(pairs))]
    names += [f"{pairs[k % len(pairs)]} {k // len(pairs) + 1}" for k in range(max(0, n - len(pairs)))]
    return names[:n]


def _sentences(words: list[str]) -> str:
    """Word salad as two capitalised sentences."""
    cut = len(words) // 2
    return " ".join(" ".join(part).capitalize() + "." for part in (words[:cut], words[cut:]) if part)


def _write_tmdb_details(folder: Path, rng, movie_ids, tmdb_ids, titles, group, year, cfg: DemoConfig) -> int:
    """tmdb/details.jsonl (see the module docstring); returns the number of records."""
    people = _people(cfg.n_groups * (ACTORS_PER_GROUP + 1) + NEUTRAL_ACTORS + NEUTRAL_DIRECTORS, rng)
    group_actors = [people[g * ACTORS_PER_GROUP:(g + 1) * ACTORS_PER_GROUP] for g in range(cfg.n_groups)]
    rest = people[cfg.n_groups * ACTORS_PER_GROUP:]
    group_directors, rest = rest[:cfg.n_groups], rest[cfg.n_groups:]
    actors, directors = rest[:NEUTRAL_ACTORS], rest[NEUTRAL_ACTORS:]
    lines = []
    for i, (mid, tmdb) in enumerate(zip(movie_ids, tmdb_ids)):
        if tmdb < 0 or rng.random() < cfg.missing_details_frac:
            continue
        g = int(group[i])
        signal = rng.random() < cfg.text_signal_frac
        words = list(rng.choice(NEUTRAL_WORDS, int(rng.integers(10, 20))))
        if signal:
            inserted = list(rng.choice(_theme(g), 3, replace=False))
        else:
            inserted = [str(rng.choice(_theme(int(rng.integers(cfg.n_groups)))))] if rng.random() < 0.5 else []
        for word in inserted:
            words.insert(int(rng.integers(len(words) + 1)), word)
        tagline = [str(w) for w in rng.choice(NEUTRAL_WORDS, 3)]
        if signal and rng.random() < 0.5:
            tagline[int(rng.integers(3))] = str(rng.choice(_theme(g)))
        n_cast = int(rng.integers(3, 9))
        cast = list(rng.choice(actors, n_cast, replace=False))
        if signal:   # two of the group's actors, at random billing positions
            for position, name in zip(rng.choice(n_cast, 2, replace=False), rng.choice(group_actors[g], 2, replace=False)):
                cast[position] = name
        director = group_directors[g] if signal and rng.random() < 0.5 else str(rng.choice(directors))
        crew = [{"name": director, "job": "Director", "department": "Directing"}]
        for job, department in (CREW_JOBS[k] for k in rng.choice(len(CREW_JOBS), int(rng.integers(1, 3)), replace=False)):
            crew.append({"name": str(rng.choice(actors)), "job": job, "department": department})
        keywords = [str(w) for w in rng.choice(NEUTRAL_WORDS, int(rng.integers(0, 4)), replace=False)]
        if signal and rng.random() < 0.5:
            keywords.append(str(rng.choice(_theme(g))))
        response = {"id": int(tmdb), "title": titles[i], "original_title": titles[i],
                    "overview": _sentences([str(w) for w in words]),
                    "tagline": " ".join(tagline).capitalize() + "!" if rng.random() < 0.6 else None,
                    "release_date": f"{year[i]}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}",
                    "runtime": int(rng.integers(75, 160)), "popularity": round(float(rng.lognormal(2.0, 1.0)), 3),
                    "vote_average": round(float(rng.uniform(3.0, 9.0)), 1), "vote_count": int(rng.integers(0, 20_000)),
                    "status": "Released", "spoken_languages": [{"iso_639_1": "en"}],
                    "credits": {"cast": [{"name": str(name), "character": str(rng.choice(NEUTRAL_WORDS)).capitalize(),
                                          "order": order} for order, name in enumerate(cast)], "crew": crew},
                    "keywords": {"keywords": [{"id": 1000 + NEUTRAL_WORDS.index(w) if w in NEUTRAL_WORDS else 2000 + g,
                                               "name": w} for w in keywords]}}
        if rng.random() < cfg.empty_details_frac:   # a record TMDB has but with nothing to read
            response.update(overview="", tagline=None, credits={"cast": [], "crew": []}, keywords={"keywords": []})
        lines.append(json.dumps({"movieId": int(mid), "tmdbId": int(tmdb), "response": response}, ensure_ascii=False))
    folder.mkdir(parents=True)
    (folder / "details.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
