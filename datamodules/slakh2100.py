"""Slakh2100 (paper 002 §5): synthesised multi-track songs, one source per instrument class.

Each track folder holds ``metadata.yaml`` (``stems: {S00: {inst_class: Guitar, audio_rendered: true}}``)
and ``stems/Sxx.flac`` (or ``Sxx.wav``, or any other format soundfile reads: converted copies of the dataset
are common; where one stem has several, ``.flac`` is preferred, then ``.wav``). A source is an ``inst_class``
(matched case-insensitively); the rendered stems of one class in a track are summed, each first downmixed
and resampled from its own rate. Tracks lacking any requested class are left out with a warning (every frame
of theirs would be silent for that class). Splits are the dataset's own ``train/``, ``validation/`` and
``test/`` folders. Audio is read with soundfile, downmixed to mono and resampled (datamodules/resample.py).
"""
import logging

import numpy as np
import soundfile
import yaml

from datamodules.stem_datamodule import DatasetLayoutError, StemDataModule, Track, dataset_root, to_mono

DEFAULT_CLASSES = ("drums", "bass", "guitar", "piano")
FOLDERS = {"train": "train", "val": "validation", "test": "test"}
LAYOUT = """  $SLAKH_ROOT/{train,validation,test}/TrackNNNNN/metadata.yaml   (stems: {S00: {inst_class: Bass, ...}, ...})
  $SLAKH_ROOT/{train,validation,test}/TrackNNNNN/stems/S00.flac, S01.flac, ...   (or .wav, any soundfile format)"""
log = logging.getLogger(__name__)
# File extensions soundfile reads (its format names, and the usual aliases); the first two are preferred.
READABLE = ["flac", "wav"] + sorted({f.lower() for f in soundfile.available_formats()} - {"flac", "wav"}
                                    | {"aif", "oga"})


def stem_file(stems_folder, stem):
    """stems/<stem>.<ext> in the first READABLE format present; the .flac path (missing) when there is none."""
    found = {path.suffix[1:].lower(): path for path in stems_folder.glob(f"{stem}.*") if path.is_file()}
    return next((found[ext] for ext in READABLE if ext in found), stems_folder / f"{stem}.flac")


def read_metadata(track_folder):
    """{stem id: inst_class (lower case)} of the stems whose audio was rendered."""
    with open(track_folder / "metadata.yaml") as stream:
        metadata = yaml.safe_load(stream)
    stems = metadata.get("stems") if isinstance(metadata, dict) else None
    if not isinstance(stems, dict):
        raise ValueError("metadata.yaml has no 'stems' mapping")
    return {stem: str(info["inst_class"]).strip().lower() for stem, info in stems.items()
            if isinstance(info, dict) and "inst_class" in info and info.get("audio_rendered", True)}


def decode_track(class_files, sample_rate):
    """[n_classes, T] float32: per class, the sum of its stems, mono at ``sample_rate``."""
    sources = []
    for files in class_files:
        total = None
        for file in files:
            audio, rate = soundfile.read(str(file), dtype="float32", always_2d=True)
            wave = to_mono(audio, rate, sample_rate).numpy()
            if total is None:
                total = wave
            else:
                length = max(len(total), len(wave))  # stems of one track can differ by a few samples
                total = np.pad(total, (0, length - len(total))) + np.pad(wave, (0, length - len(wave)))
        sources.append(np.asarray(total))
    length = min(len(s) for s in sources)
    array = np.stack([s[:length] for s in sources])
    if not np.isfinite(array).all():
        raise ValueError("decodes to NaN or infinite samples")
    return array


class SlakhDataModule(StemDataModule):
    dataset_name = "slakh2100"
    layout = LAYOUT

    def __init__(self, root=None, sources=DEFAULT_CLASSES, **options):
        super().__init__(sources=[s.lower() for s in sources], **options)
        self.root = dataset_root(root, "SLAKH_ROOT", "slakh2100", LAYOUT)

    def list_tracks(self, split):
        folder = self.root / FOLDERS[split]
        if not folder.is_dir():
            raise DatasetLayoutError(f"slakh2100 root {self.root} has no {FOLDERS[split]}/ folder. "
                                     f"Expected layout:\n{LAYOUT}")
        track_folders = sorted(p for p in folder.iterdir() if p.is_dir())
        if not track_folders:
            raise DatasetLayoutError(f"no track folder in {folder}. Expected layout:\n{LAYOUT}")
        tracks, classes_seen, lacking = [], set(), {}  # lacking: requested class -> tracks without it
        for track_folder in track_folders:
            track, seen = self.track(track_folder)
            classes_seen |= seen
            if track is not None:
                tracks.append((track, list(range(len(self.sources)))))
            else:
                for name in self.sources:
                    if name not in seen:
                        lacking.setdefault(name, []).append(track_folder.name)
        if not tracks:
            absent = [name for name in self.sources if name not in classes_seen]
            why = (f"{absent} {'is' if len(absent) == 1 else 'are'} in no track of the {split} split" if absent else
                   f"each class is in some track of the {split} split, never all in one")
            raise DatasetLayoutError(
                f"no track in {folder} has every requested class {self.sources} "
                f"(classes found: {sorted(classes_seen) or 'none'}): {why}. Choose data.sources among the classes "
                f"found (a track must have them all). Expected layout:\n{LAYOUT}")
        if lacking:
            # One line per split: on the real dataset many tracks lack one of four classes; name a few of each.
            examples = "; ".join(f"no {name}: {', '.join(names[:5])}" + f" and {len(names) - 5} more" * (len(names) > 5)
                                 for name, names in lacking.items())
            log.warning("slakh2100 %s: %d of %d tracks lack a requested class and are left out (%s)", split,
                        len(track_folders) - len(tracks), len(track_folders), examples)
        return tracks

    def track(self, track_folder):
        """(the Track, or None when a requested class is absent; the classes seen). An unreadable
        metadata.yaml or a missing stem gives a Track whose decode fails, so it is skipped with a warning."""
        try:
            stems = read_metadata(track_folder)
        except (OSError, ValueError, KeyError, yaml.YAMLError) as error:
            track = Track(name=track_folder.name, files=[track_folder], decode=_raiser(
                f"unreadable {track_folder / 'metadata.yaml'}: {error}"))
            return track, set()
        seen = set(stems.values())
        if not set(self.sources) <= seen:
            return None, seen
        class_files = [[stem_file(track_folder / "stems", stem) for stem, c in sorted(stems.items()) if c == name]
                       for name in self.sources]
        files = [f for group in class_files for f in group]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            decode = _raiser(f"metadata.yaml lists stems that are missing (no file in any format soundfile reads): "
                             f"{', '.join(missing)}")
            return Track(name=track_folder.name, files=[track_folder], decode=decode), seen
        decode = lambda: decode_track(class_files, self.sample_rate)  # noqa: E731
        return Track(name=track_folder.name, files=files, decode=decode,
                     options={"dataset": "slakh2100", "classes": self.sources}), seen


def _raiser(message):
    """A decode() for a track known to be unusable: skipped with this message, like a failed decode."""
    def decode():
        raise ValueError(message)
    return decode
