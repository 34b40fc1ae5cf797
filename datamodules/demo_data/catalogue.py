"""Which scores of music21's corpus the demo set is made of, and each score read into plain note lists.

Only the collections named in GROUPS are read: string quartets, medieval and Renaissance polyphony,
Baroque trio and aria textures, and fiddle tunes from Ryan's Mammoth Collection (1883). The Bach chorales
(``bach/``) are never listed: they are kept as an independent held-out check, so no demo song may come
from them. Essen folksongs are left out too: their licence allows non-commercial use only.

The order in which pieces are tried is a pure function of the seed: each collection's paths sorted, then
shuffled by a seeded generator, then taken round-robin over groups and, inside a group, over collections
(so 1300 Palestrina files do not crowd out everything else). A piece that cannot be read or is too thin
(fewer than three voices, or a tune without a melody) is skipped, which is deterministic too. The encodings
of ``luca/`` and ``ciconia/`` are CC-BY-SA (share-alike would bind the rendered audio), so they are not used.
"""
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

# group -> (corpus collections, default tempo range in quarter notes per minute where a score gives none)
GROUPS = {
    "quartet": (("haydn", "mozart", "beethoven"), (96.0, 132.0)),
    "early": (("palestrina", "monteverdi", "trecento", "lusitano"), (120.0, 160.0)),
    "baroque": (("corelli", "handel"), (72.0, 100.0)),
    "folk": (("ryansMammoth",), (100.0, 126.0)),
}
RESERVED = ("bach",)  # the chorales: an independent held-out check, never demo material
# Preferred encoding where one work comes in several (Beethoven op. 18 no. 1 has .krn and .mxl).
EXTENSIONS = (".mxl", ".xml", ".krn", ".abc")


@dataclass
class Piece:
    """A score as note lists in quarter notes: ``lines`` are (onset, duration, MIDI pitch) per voice, the
    highest voice first; ``length`` is one play through; ``phase`` is where the first full bar starts."""
    path: str
    group: str
    lines: list
    tempo: float
    bar: float
    beat: float
    phase: float
    length: float
    harmonised: bool = False
    composer: str = ""
    work: str = ""
    copyright: str = ""

    @property
    def title(self):
        """An ASCII name for song folders: the corpus path without its extension, separators as spaces."""
        stem = str(PurePosixPath(self.path).with_suffix(""))
        clean = "".join(c if c.isascii() and (c.isalnum() or c in " -_.") else " " for c in stem.replace("/", " "))
        return " ".join(clean.split())


def corpus_root():
    from music21 import corpus

    return Path(corpus.__file__).parent


def collection_paths(root, collection):
    """Sorted corpus paths (relative, POSIX) of one collection, one encoding per work."""
    by_work = {}
    for path in sorted((root / collection).rglob("*")):
        if path.suffix.lower() in EXTENSIONS and path.is_file():
            rel = path.relative_to(root).as_posix()
            work = rel[:-len(path.suffix)]
            best = by_work.get(work)
            if best is None or EXTENSIONS.index(path.suffix.lower()) < EXTENSIONS.index(PurePosixPath(best).suffix):
                by_work[work] = rel
    return sorted(by_work.values())


def stable_seed(seed, text):
    """A generator seed from the build seed and a name; Python's hash() is salted per process, crc32 is not."""
    return [int(seed), zlib.crc32(text.encode("utf-8"))]


def candidate_order(seed, root=None):
    """Every usable corpus path, in the order the builder tries them: a pure function of ``seed``."""
    root = corpus_root() if root is None else Path(root)
    queues = {}
    for group, (collections, _) in GROUPS.items():
        lists = []
        for collection in collections:
            if collection in RESERVED:
                raise ValueError(f"{collection} is reserved and may not be a demo collection")
            paths = collection_paths(root, collection)
            np.random.default_rng(stable_seed(seed, collection)).shuffle(paths)
            lists.append((collection, paths))
        queues[group] = [(group, path) for path in round_robin([paths for _, paths in lists])]
    return round_robin(list(queues.values()))


def round_robin(lists):
    out, index = [], 0
    while any(index < len(items) for items in lists):
        out.extend(items[index] for items in lists if index < len(items))
        index += 1
    return out


def first_meter(score):
    from music21 import meter

    signatures = score.flatten().getElementsByClass(meter.TimeSignature)
    signature = signatures[0] if signatures else meter.TimeSignature("4/4")
    bar = float(signature.barDuration.quarterLength)
    beat = float(signature.beatDuration.quarterLength)
    return bar, beat if 0 < beat <= bar else bar


def score_tempo(score, low, high, rng):
    """The score's first metronome mark if it has a plausible one, else a seeded tempo in [low, high]."""
    from music21 import tempo

    for mark in score.flatten().getElementsByClass(tempo.MetronomeMark):
        try:
            qpm = float(mark.getQuarterBPM())
        except (TypeError, ValueError, AttributeError):
            continue
        if 40.0 <= qpm <= 240.0:
            return qpm
    return float(rng.uniform(low, high))


def part_notes(part):
    """(onset, duration, pitch) of every sounding pitch of a part, ties merged, grace notes dropped."""
    flat = part.stripTies().flatten()
    notes = []
    for element in flat.notes:
        duration = float(element.quarterLength)
        if duration <= 0:
            continue
        onset = float(element.getOffsetBySite(flat))
        for pitch in getattr(element, "pitches", ()):
            if 0 <= pitch.midi <= 127:
                notes.append((onset, duration, int(pitch.midi)))
    return sorted(notes)


def bar_phase(part, bar):
    """Where full bars start: after an anacrusis the second measure's offset, modulo the bar."""
    measures = list(part.getElementsByClass("Measure"))
    if len(measures) < 2:
        return 0.0
    return float(measures[1].offset) % bar


def parse(path, root=None):
    from music21 import converter

    root = corpus_root() if root is None else Path(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21 warns about encoding details it works around
        return converter.parse(root / path, forceSource=True)  # forceSource: no pickle cache written


def read_piece(group, path, seed, root=None):
    """The Piece of one corpus path, or None when it cannot serve (unreadable, an opus of several works,
    too few voices for polyphony, an empty tune)."""
    from datamodules.demo_data.folk import harmonise

    try:
        score = parse(path, root)
        if not hasattr(score, "parts") or type(score).__name__ == "Opus":
            return None
        credit = credits(score)
        if group == "folk":
            try:
                score = score.expandRepeats()
            except Exception:  # music21 raises several kinds on repeat marks it cannot expand; play as written
                pass
        parts = [p for p in score.parts]
        lines = [part_notes(p) for p in parts]
        bar, beat = first_meter(score)
        phase = bar_phase(parts[0], bar) if parts else 0.0
        key = score.analyze("key") if group == "folk" and any(lines) else None
    except Exception:  # a score music21 cannot read is skipped like a thin one
        return None
    lines = [line for line in lines if line]
    if not lines:
        return None
    length = max(onset + duration for line in lines for onset, duration, _ in line)
    rng = np.random.default_rng(stable_seed(seed, path))
    tempo = score_tempo(score, *GROUPS[group][1], rng)
    harmonised = False
    if group == "folk":
        lines = harmonise(max(lines, key=len), key.tonic.pitchClass, key.mode, bar, beat, phase, length)
        harmonised = True
    if len(lines) < 3:
        return None
    lines.sort(key=lambda line: -float(np.median([pitch for _, _, pitch in line])))
    return Piece(path=path, group=group, lines=lines, tempo=tempo, bar=bar, beat=beat, phase=phase,
                 length=length, harmonised=harmonised, **credit)


def credits(score):
    """The composer, title and copyright notice the encoding carries (empty strings where it has none)."""
    metadata = score.metadata

    def text(name):
        value = getattr(metadata, name, None) if metadata is not None else None
        return " ".join(str(value).split()) if value else ""

    return {"composer": text("composer"), "work": text("title"), "copyright": text("copyright")}


def playable_songs(piece, seconds, cap, max_plays=4):
    """(songs, plays): how many ``seconds``-long songs the piece gives, at most ``cap``, and how often it is
    played through to give them. A piece shorter than one song is repeated, up to ``max_plays`` times."""
    play_seconds = piece.length * 60.0 / piece.tempo
    plays = 1 if play_seconds >= seconds else math.ceil(seconds / play_seconds)
    if plays > max_plays:
        return 0, plays
    return min(cap, int(plays * play_seconds // seconds)), plays
