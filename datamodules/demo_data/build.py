"""The demo set from plan to marker: which songs, in which split, rendered and written in both layouts.

Split sizes. ``songs`` = 1 gives one test song (a smoke test). Otherwise a sixth (rounded up) is test and,
of the rest, a tenth (at least one) is validation: the same tenth that ``datamodules/musdb18.py`` holds out of
a ``train/`` folder without musdb's own validation songs, and the validation songs carry the highest numbers,
so musdb's rule finds exactly them. The default 48 songs give 36 train, 4 validation and 8 test.

Splits are filled test first, then validation, then train, piece by piece in the catalogue's order; a piece
gives at most SONGS_PER_PIECE consecutive windows, all in the split it was taken for.

A rerun into a finished demo folder with the same request and the same renderer and music21 versions does
nothing. Otherwise (another request, an interrupted build) the folder's demo files are deleted and built
again: the same request always gives the same bytes. A non-empty folder that holds neither marker is never
touched.
"""
import json
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from datamodules.atomic_io import atomic_write_text, file_sha256
from datamodules.demo_data import catalogue, fluidsynth, layouts
from datamodules.demo_data.arrangement import arrange
from datamodules.demo_data.licences import readme_text
from datamodules.demo_data.midi_file import midi_bytes
from datamodules.demo_data.mixing import to_integers

MARKER = "demo_data.json"  # written last: its presence means the set is complete
BUILDING = ".demo_data_building"  # written first: the folder is ours even if the build stops half-way
README = "README.md"
OWNED = ("musdb", "slakh", README, MARKER, BUILDING)
SONGS_PER_PIECE = 2
# Raise when a change to this package changes what a request builds, so a rerun rebuilds instead of skipping.
BUILDER_VERSION = 1
SPLIT_ORDER = ("train", "validation", "test")  # numbering order, as in Slakh2100


class DemoDataError(ValueError):
    """A request or an output folder the builder refuses, with the reason."""


def split_sizes(songs):
    if songs == 1:
        return {"train": 0, "validation": 0, "test": 1}
    if songs < 3:
        raise DemoDataError(f"songs must be 1 (one test song) or at least 3 (train, validation, test), got {songs}")
    test = math.ceil(songs / 6)
    validation = max(1, (songs - test) // 10)
    return {"train": songs - test - validation, "validation": validation, "test": test}


def group_of(path):
    collection = path.split("/", 1)[0]
    if collection in catalogue.RESERVED:
        raise DemoDataError(f"{path}: the {collection} collection is reserved as a held-out check")
    for group, (collections, _) in catalogue.GROUPS.items():
        if collection in collections:
            return group
    known = sorted(c for collections, _ in catalogue.GROUPS.values() for c in collections)
    raise DemoDataError(f"{path} is not in a demo collection ({', '.join(known)})")


def plan_songs(songs, seconds, seed, paths=None, cap=SONGS_PER_PIECE):
    """[Song], numbered train first, then validation, then test."""
    sizes = split_sizes(songs)
    candidates = [(group_of(p), p) for p in paths] if paths else catalogue.candidate_order(seed)
    wanted = [split for split in ("test", "validation", "train") if sizes[split]]
    taken = {split: [] for split in SPLIT_ORDER}
    for group, path in candidates:
        if not wanted:
            break
        piece = catalogue.read_piece(group, path, seed)
        if piece is None:
            continue
        available, _ = catalogue.playable_songs(piece, seconds, cap)
        split = wanted[0]
        take = min(available, sizes[split] - len(taken[split]))
        taken[split].extend((piece, window) for window in range(take))
        if len(taken[split]) == sizes[split]:
            wanted.pop(0)
    if wanted:
        have = sum(len(v) for v in taken.values())
        raise DemoDataError(f"the corpus gave only {have} of {songs} songs of {seconds:g} s; ask for fewer")
    width = max(3, len(str(songs)))
    ordered = [(split, piece, window) for split in SPLIT_ORDER for piece, window in taken[split]]
    return [layouts.Song(number + 1, split, piece, window, width)
            for number, (split, piece, window) in enumerate(ordered)]


def render_piece(task):
    """Render every stem of one piece once, then write each of its songs: (written paths, seconds taken)."""
    piece, songs, seconds, seed, root, program, soundfont = task
    started = time.perf_counter()
    rate = fluidsynth.SAMPLE_RATE
    frames = int(round(seconds * rate))
    windows = max(song.window for song in songs) + 1
    quarters_per_song = seconds * piece.tempo / 60.0
    rng = np.random.default_rng(catalogue.stable_seed(seed, "arrangement:" + piece.path))
    stems = arrange(piece, windows * quarters_per_song, rng)
    audio = [fluidsynth.render(midi_bytes(stem.notes, stem.program, piece.tempo, stem.channel, stem.pan),
                               windows * frames, program, soundfont, rate) for stem in stems]
    written = []
    for song in songs:
        cut = slice(song.window * frames, (song.window + 1) * frames)
        integers = to_integers([a[cut] for a in audio], [stem.musdb for stem in stems], rate)
        written.append(layouts.write_musdb(root, song, stems, integers, rate))
        span = (song.window * quarters_per_song, (song.window + 1) * quarters_per_song)
        written.append(layouts.write_slakh(root, song, stems, integers, rate, span))
    return written, time.perf_counter() - started


def run_tasks(tasks, jobs, log):
    """Render the pieces, in worker processes when ``jobs`` > 1 (each piece's bytes do not depend on which)."""
    def report(results):
        for index, ((_, took), task) in enumerate(zip(results, tasks)):
            log(f"  [{index + 1}/{len(tasks)}] {task[0].path}: {len(task[1])} song(s) in {took:.1f} s")

    if jobs == 1 or len(tasks) == 1:
        report(map(render_piece, tasks))
        return
    with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
        report(pool.map(render_piece, tasks))


def prepare_root(root, request, versions):
    """'skip' when ``root`` already holds this finished set; otherwise make it ready for a build and 'build'."""
    if root.exists() and not root.is_dir():
        raise DemoDataError(f"{root} is a file, not a folder; choose another output folder (DEMO_ROOT)")
    if root.is_dir():
        marker = root / MARKER
        ours = marker.is_file() or (root / BUILDING).is_file()
        if not ours and any(root.iterdir()):
            raise DemoDataError(f"{root} is not empty and holds no demo set (no {MARKER}); refusing to write into "
                                "it. Choose another folder (DEMO_ROOT=...) or empty this one")
        if marker.is_file():
            try:
                previous = json.loads(marker.read_text())
            except (OSError, ValueError):
                previous = {}
            if previous.get("request") == request and previous.get("versions") == versions:
                return "skip"
        for name in OWNED:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / BUILDING, json.dumps({"request": request}, sort_keys=True) + "\n")
    except OSError as error:
        raise DemoDataError(f"cannot write the demo set into {root}: {error}") from error
    return "build"


def versions_of(program):
    import music21

    soundfont = fluidsynth.soundfont_path()
    return {"builder": BUILDER_VERSION, "renderer": fluidsynth.renderer_version(program),
            "music21": music21.__version__, "soundfont": {"name": soundfont.name, "bytes": soundfont.stat().st_size}}


def build_demo_data(root, songs=48, seconds=30.0, seed=0, jobs=1, paths=None, log=print):
    """Build (or find already built) the demo set in ``root``; returns the marker's content."""
    root = Path(root)
    if seconds <= 0 or jobs < 1:
        raise DemoDataError(f"seconds must be positive and jobs at least 1 (got seconds={seconds}, jobs={jobs})")
    program, soundfont = fluidsynth.find_renderer()
    request = {"songs": int(songs), "seconds": float(seconds), "seed": int(seed), "paths": list(paths or [])}
    versions = versions_of(program)
    if prepare_root(root, request, versions) == "skip":
        log(f"{root} already holds this demo set ({MARKER}); nothing to do (delete the folder to rebuild)")
        return json.loads((root / MARKER).read_text())
    plan = plan_songs(int(songs), float(seconds), int(seed), paths)
    by_piece = {}
    for song in plan:
        by_piece.setdefault(song.piece.path, []).append(song)
    tasks = [(group[0].piece, group, float(seconds), int(seed), root, program, soundfont)
             for group in by_piece.values()]
    log(f"rendering {len(plan)} songs from {len(tasks)} pieces into {root} ({jobs} job(s))")
    run_tasks(tasks, jobs, log)
    atomic_write_text(root / README, readme_text(request, plan, versions["renderer"], versions["music21"]))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MARKER, BUILDING))
    marker = {
        "request": request, "versions": versions,
        "splits": {split: [song.number for song in plan if song.split == split] for split in SPLIT_ORDER},
        "songs": [{"number": s.number, "split": s.split, "musdb": s.musdb_name, "slakh": s.track_name,
                   "corpus_path": s.piece.path, "window": s.window} for s in plan],
        "files": {p.relative_to(root).as_posix(): file_sha256(p) for p in files},
    }
    atomic_write_text(root / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
    (root / BUILDING).unlink()
    return marker
