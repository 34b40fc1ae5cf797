"""musdb18 (paper 003 §3.1): 100 train / 50 test songs with drums, bass, other and vocals stems.

The STEMS release (``<split>/<track>.stem.mp4``) is read with the ``musdb`` package (decoded by ffmpeg);
MUSDB18-HQ (``<split>/<track>/<stem>.wav``, ``is_wav=True``) with soundfile, each stem at its own rate and
channel count (musdb's track objects would force the mixture's on every stem). The validation
split is musdb's own list of 14 training songs (its ``mus.yaml``). A tree of one's own songs in these
layouts holds none of them: then the last tenth of the training songs in sorted name order (at least
one, never all) is the validation split, with a warning. Stems are downmixed to mono and
resampled once (datamodules/resample.py), then served from the stem cache. ``musdb.DB`` is not used to list
the songs: it probes every file with ffprobe on each start, and one corrupt file would stop it; we
list the folders ourselves and build musdb's track objects (STEMS) one song at a time.
"""
import logging
import warnings
from pathlib import Path

import musdb
import numpy as np
import soundfile
import yaml

from datamodules.stem_datamodule import DatasetLayoutError, StemDataModule, Track, dataset_root, to_mono

STEMS = ("drums", "bass", "other", "vocals")  # the order of the cached array's rows
LAYOUT = """  $MUSDB_ROOT/train/<Artist - Title>.stem.mp4   (MUSDB18, STEMS release)
  $MUSDB_ROOT/test/<Artist - Title>.stem.mp4
or
  $MUSDB_ROOT/train/<Artist - Title>/{mixture,drums,bass,other,vocals}.wav   (MUSDB18-HQ)
  $MUSDB_ROOT/test/<Artist - Title>/...wav"""
# split -> (musdb subset folder, musdb split)
SUBSETS = {"train": ("train", "train"), "val": ("train", "valid"), "test": ("test", None)}
log = logging.getLogger(__name__)


def own_validation_names(names):
    """A user's own songs (none on musdb's list): the last tenth of ``names`` sorted, at least one, never all."""
    names = sorted(names)
    if len(names) < 2:
        raise DatasetLayoutError(f"{len(names)} training song(s) and none on musdb's validation list: at least 2 "
                                 "are needed, one held out for validation")
    return names[len(names) - max(1, len(names) // 10):]


def musdb_setup():
    """musdb's own configuration: stem ids, file names and the validation track list."""
    with open(Path(musdb.__path__[0]) / "configs" / "mus.yaml") as stream:
        return yaml.safe_load(stream)


def check_sources(sources):
    unknown = [s for s in sources if s not in STEMS]
    if unknown:
        raise ValueError(f"unknown musdb source(s) {unknown}; choose from {list(STEMS)}")


def detect_is_wav(folder):
    if any(folder.glob("*.stem.mp4")):
        return False
    if any(folder.glob("*/*.wav")):
        return True
    raise DatasetLayoutError(f"{folder} holds neither .stem.mp4 files nor track folders of .wav stems. "
                             f"Expected layout:\n{LAYOUT}")


class UnequalStemsWarning(UserWarning):
    """A musdb18 track whose stems differ in length by more than codec padding."""


def decode_track(name, path, is_wav, stem_files, sample_rate, setup):
    """[4, T] float32, rows in STEMS order, mono at ``sample_rate``: .stem.mp4 through musdb's track objects,
    HQ .wav stems each with soundfile at its own rate and channel count."""
    if is_wav:
        # Not through musdb: its track objects decode every .wav stem at the mixture's rate and reshape it to
        # the mixture's channel count without converting, so a mono stem beside a stereo mixture came out at
        # half its length and twice its pitch.
        stems = [to_mono(*soundfile.read(str(file), dtype="float32", always_2d=True), sample_rate)
                 for file in stem_files]
    else:
        track = musdb.MultiTrack(path=str(path), name=name, is_wav=is_wav,
                                 stem_id=setup["stem_ids"]["mixture"])
        if track.rate is None:
            raise OSError(f"cannot read {path}")
        stems = []
        for stem, file in zip(STEMS, stem_files):
            audio = musdb.Source(track, name=stem, path=str(file), stem_id=setup["stem_ids"][stem]).audio
            stems.append(to_mono(audio, track.rate, sample_rate))
    length = min(len(s) for s in stems)  # AAC padding can differ by a frame between streams
    if max(len(s) for s in stems) - length > sample_rate // 10:  # more than padding: the user should know
        lengths = ", ".join(f"{stem} {len(s) / sample_rate:.2f} s" for stem, s in zip(STEMS, stems))
        warnings.warn(f"musdb18 track {name!r}: its stems differ in length ({lengths}); every stem is cut to the "
                      f"shortest, so the end of the longer ones is not used", UnequalStemsWarning, stacklevel=2)
    array = np.stack([s[:length].numpy() for s in stems])
    if not np.isfinite(array).all():
        raise ValueError(f"{path} decodes to NaN or infinite samples")
    return array


class MusdbDataModule(StemDataModule):
    dataset_name = "musdb18"
    layout = LAYOUT

    def __init__(self, root=None, sources=STEMS, is_wav=None, **options):
        check_sources(list(sources))
        super().__init__(sources=sources, **options)
        self.root = dataset_root(root, "MUSDB_ROOT", "musdb18", LAYOUT)
        self.is_wav = is_wav
        self.setup_yaml = musdb_setup()

    def list_tracks(self, split):
        subset, musdb_split = SUBSETS[split]
        folder = self.root / subset
        if not folder.is_dir():
            raise DatasetLayoutError(f"musdb18 root {self.root} has no {subset}/ folder. Expected layout:\n{LAYOUT}")
        is_wav = detect_is_wav(folder) if self.is_wav is None else self.is_wav
        names = sorted(p.name[:-len(".stem.mp4")] for p in folder.glob("*.stem.mp4")) if not is_wav else \
            sorted(p.name for p in folder.iterdir() if p.is_dir())
        validation = set(self.setup_yaml["validation_tracks"])
        if names and musdb_split is not None and not validation & set(names):
            validation = set(own_validation_names(names))
            if musdb_split == "valid":  # said once, when the validation split is listed
                log.warning("musdb18 %s holds none of musdb's validation songs; validating on the last tenth of "
                            "its %d training songs by sorted name (%d: %s) and training on the rest", folder,
                            len(names), len(validation), ", ".join(sorted(validation)))
        if musdb_split == "train":
            names = [n for n in names if n not in validation]
        elif musdb_split == "valid":
            names = [n for n in names if n in validation]
        if not names:
            which = {"train": "", "valid": " of musdb's validation list"}.get(musdb_split, "")
            raise DatasetLayoutError(f"no musdb18 track{which} in {folder} ({'wav folders' if is_wav else '.stem.mp4'}"
                                     f", is_wav={is_wav}). Expected layout:\n{LAYOUT}")
        rows = [STEMS.index(s) for s in self.sources]
        return [(self.track(folder, name, is_wav), rows) for name in names]

    def track(self, folder, name, is_wav):
        if is_wav:
            path = folder / name / self.setup_yaml["mixture"]
            stem_files = [folder / name / self.setup_yaml["sources"][s] for s in STEMS]
            files = stem_files
        else:
            path = folder / f"{name}.stem.mp4"
            stem_files, files = [path] * len(STEMS), [path]
        missing = [str(f) for f in files + [path] if not f.is_file()]

        def decode():
            if missing:
                raise FileNotFoundError(f"missing {', '.join(sorted(set(missing)))}")
            return decode_track(name, path, is_wav, stem_files, self.sample_rate, self.setup_yaml)

        # The fingerprint needs existing files; a missing one is reported by decode() and skipped.
        present = [f for f in files if f.is_file()] or [folder]
        options = {"dataset": "musdb18", "stems": list(STEMS), "is_wav": is_wav}
        if is_wav:  # a new key: HQ entries decoded through musdb (see decode_track) are rebuilt, STEMS ones kept
            options["reader"] = "soundfile"
        return Track(name=name, files=present, decode=decode, options=options)
