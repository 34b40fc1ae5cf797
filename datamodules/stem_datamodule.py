"""The LightningDataModule shared by the multi-stem datasets (musdb18, Slakh2100).

A subclass says where the tracks of a split are and how to decode one (``list_tracks``); this class
decodes each track once into the stem cache, skips a track that fails with a warning, and serves
random non-silent training frames and a fixed list of non-silent evaluation frames. Items look like
the toy data's: ``{"sources": [N, T], "mix": [T], "index"}``, but the mix is the SUM of the stems, as
in the songs themselves (the toy data's is their mean), so a separation test loop scores what a user
would separate.
"""
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import torch

from datamodules.loaders import SplitDataModule
from datamodules.resample import resample
from datamodules.stem_cache import StemCache
from datamodules.stem_frames import FixedFrames, RandomFrames, SongArrays

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    """The dataset root is missing or not laid out as expected; the message names the path and the layout."""


class SkippedTrackWarning(UserWarning):
    """One track could not be used (unreadable or incomplete) and was left out."""


@dataclass
class Track:
    name: str
    files: List[Path]  # every file decoded for this track: their size and mtime invalidate the cache
    decode: Callable  # () -> float32 array [n_stored_sources, T] at the target sample rate
    options: dict = field(default_factory=dict)  # what else the decoded array depends on (cache key)


def to_mono(audio, rate, sample_rate):
    """[T, C] or [T] numpy audio at ``rate`` -> float32 tensor [T], mono, at ``sample_rate``."""
    wave = torch.as_tensor(audio, dtype=torch.float32)
    wave = wave.mean(dim=1) if wave.dim() == 2 else wave
    return resample(wave, rate, sample_rate)


def dataset_root(root, env_var, dataset, layout):
    """The configured root, else $env_var; an error naming both and the layout when neither exists."""
    root = root or os.environ.get(env_var)
    if not root:
        raise DatasetLayoutError(f"no {dataset} root: set {env_var}=/path/to/{dataset} or data.root=... "
                                 f"Expected layout:\n{layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"{dataset} root {root} does not exist or is not a folder "
                                 f"(from data.root or {env_var}). Expected layout:\n{layout}")
    return root


def describe_silence(silent, length):
    """A left-out song's reason, from StemDataModule.silent_throughout."""
    if silent is None:
        return f"shorter than {length} samples"
    return f"silent throughout: {', '.join(silent)}" if silent else "its sources never sound in the same frame"


class SummedSongArrays(SongArrays):
    """The songs' frames with the mix a real song has: the sum of its stems (SongArrays serves their mean)."""

    def item(self, song, start, length, index):
        item = super().item(song, start, length, index)
        item["mix"] = item["sources"].sum(dim=0)
        return item


class StemDataModule(SplitDataModule):
    dataset_name = "stems"
    layout = ""
    mixing = "sum"  # datamodules/registry.py MIXING reads it

    def __init__(self, sources, sample_rate, crop_length, eval_length, batch_size, eval_batch_size,
                 frames_per_song=150, silence_threshold=1.5e-5, max_tracks=None, n_val=500, n_test=1500,
                 num_workers=0, seed=0, cache_dir="runs/stem_cache"):
        super().__init__()
        if sample_rate <= 0:
            raise ValueError(f"data.sample_rate must be positive, got {sample_rate}")
        if not sources:
            raise ValueError("data.sources is empty; name at least one source")
        if min(crop_length, eval_length) <= 0 or frames_per_song <= 0:
            raise ValueError("data.crop_length, data.eval_length and data.frames_per_song must be positive")
        if silence_threshold < 0:
            raise ValueError(f"data.silence_threshold must be >= 0 (0 keeps every frame), got {silence_threshold}")
        self.sources, self.sample_rate = list(sources), sample_rate
        self.crop_length, self.eval_length = crop_length, eval_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.frames_per_song, self.silence_threshold = frames_per_song, silence_threshold
        self.max_tracks, self.num_workers, self.seed = max_tracks, num_workers, seed
        self.max_items = {"val": n_val, "test": n_test}
        self.cache = StemCache(cache_dir)
        self.datasets = {}

    def list_tracks(self, split):
        """[(Track, rows of the decoded array holding self.sources)] for ``split``; raises
        DatasetLayoutError when the split's folder is missing or holds no usable track."""
        raise NotImplementedError

    def setup(self, stage=None):
        # Every DDP rank gets here; the stem cache's per-track lock makes one of them decode each track
        # while the others wait for it, so nothing is decoded twice.
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, SPLITS)
        for split in wanted:
            self.dataset(split)

    def load_songs(self, split, length=None):
        """The split's cached songs, decoding the missing ones; a track that fails is skipped with a warning.
        With ``max_tracks``, decoding stops once that many songs have a ``length``-sample frame where every
        requested source sounds: a song silent in a requested class does not use up the budget."""
        tracks = self.list_tracks(split)
        paths, names, rows, failures, usable = [], [], None, [], 0
        for track, track_rows in tracks:
            if self.max_tracks is not None and usable >= self.max_tracks:
                break
            try:
                self.cache.load(track.files, self.sample_rate, track.decode, track.options)
            except Exception as error:  # noqa: BLE001 - any decoder failure means: skip this one track
                failures.append(f"{track.name}: {error}")
                warnings.warn(f"skipping {self.dataset_name} track {track.name!r} ({track.files[0]}): {error}",
                              SkippedTrackWarning, stacklevel=2)
                continue
            paths.append(self.cache.path(track.files, self.sample_rate, track.options))
            names.append(track.name)
            rows = track_rows
            if self.max_tracks is not None:  # only then: dataset() scans every song for its frames anyway
                song = SummedSongArrays(paths[-1:], rows)
                usable += length is None or bool(len(song.valid_starts(0, length, self.silence_threshold)))
        if not paths:
            raise DatasetLayoutError(f"no usable {self.dataset_name} track in split {split!r}: "
                                     + "; ".join(failures[:5]) + f". Expected layout:\n{self.layout}")
        return SummedSongArrays(paths, rows), names

    def silent_throughout(self, songs, song, length):
        """The requested sources with no non-silent frame in the song (None when it is shorter than a frame)."""
        if songs.n_samples(song) < length:
            return None
        return [self.sources[k] for k in songs.silent_sources(song, length, self.silence_threshold)]

    def no_frame_message(self, split, length, left_out):
        """The error when no song of a split serves a frame: which sources are to blame, and the ways out."""
        where = f"no {length}-sample frame of the {self.dataset_name} {split} split"
        long_enough = [silent for silent in left_out.values() if silent is not None]
        if not long_enough:
            return (f"{where} fits in a song: every song is shorter than {length} samples at {self.sample_rate} Hz; "
                    f"lower data.crop_length / data.eval_length")
        # The usual case: a class absent from the whole split (a musdb stem of zeros, a Slakh class rendered silent).
        always = [s for s in self.sources if all(s in silent for silent in long_enough)]
        blame = (f"{always} {'is' if len(always) == 1 else 'are'} silent in every song" if always else
                 "each song has a silent source: " + "; ".join(f"{name} ({describe_silence(silent, length)})"
                                                               for name, silent in list(left_out.items())[:5]))
        return (f"{where} has every source of {self.sources} sounding under data.silence_threshold="
                f"{self.silence_threshold} (a frame is dropped when ||x_k||_2 / length is below it for any source k): "
                f"{blame}. Choose other data.sources (without the silent ones) or lower data.silence_threshold "
                f"(0 keeps every frame)")

    def dataset(self, split):
        if split not in self.datasets:
            length = self.crop_length if split == "train" else self.eval_length
            songs, names = self.load_songs(split, length)
            starts = [songs.valid_starts(i, length, self.silence_threshold) for i in range(len(songs))]
            # name -> the requested sources silent throughout it (None: shorter than one frame)
            left_out = {name: self.silent_throughout(songs, i, length) for i, name in enumerate(names)
                        if not len(starts[i])}
            if left_out:
                log.warning("%s %s: no non-silent %d-sample frame in %s; left out", self.dataset_name, split, length,
                            ", ".join(f"{name} ({describe_silence(silent, length)})"
                                      for name, silent in left_out.items()))
            kept = [(i, s) for i, s in enumerate(starts) if len(s)]
            if not kept:
                raise DatasetLayoutError(self.no_frame_message(split, length, left_out))
            songs = SummedSongArrays([songs.paths[i] for i, _ in kept], songs.rows)
            starts = [s for _, s in kept]
            if split == "train":
                self.datasets[split] = RandomFrames(songs, starts, length, self.frames_per_song)
            else:
                self.datasets[split] = FixedFrames(songs, starts, length, self.max_items[split])
            log.info("%s %s: %d songs, %d items", self.dataset_name, split, len(kept), len(self.datasets[split]))
        return self.datasets[split]
