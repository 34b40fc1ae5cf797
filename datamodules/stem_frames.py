"""Frames of equal length cut from cached multi-stem songs, with the silent-frame rule.

A song is a float32 array [n_sources, T] (a memory map from the stem cache). A frame is silent when
``||x_k||_2 / L < threshold`` for ANY source k (paper 002's rule for Slakh2100, 1.5e-5; we use the
same measure for musdb). Silent frames are never served: a flow prior scores a near-silent stem
with a huge likelihood and, once normalised, blows it up (the thesis code's bug).

Frame starts live on a grid of ``stride`` samples so that the energy of every candidate frame comes
from one pass of block sums over the song, without holding per-sample masks.
"""
import math

import numpy as np
import torch
from torch.utils.data import Dataset

GRID = 256  # samples between candidate frame starts (16 ms at 16 kHz)


def frame_stride(length):
    """The grid step: a divisor of ``length``, so a frame is a whole number of blocks."""
    return math.gcd(length, GRID)


def frame_norms(song, length, stride):
    """||x_k||_2 / length of the frame starting at every grid point: float64 [n_sources, n_starts]."""
    n_blocks = song.shape[1] // stride
    per_frame = length // stride
    if n_blocks < per_frame:
        return np.zeros((song.shape[0], 0))
    blocks = np.empty((song.shape[0], n_blocks))
    chunk = 1 << 20  # read the memory map in bounded pieces
    for first in range(0, n_blocks, chunk // stride):
        last = min(n_blocks, first + chunk // stride)
        piece = np.asarray(song[:, first * stride:last * stride], dtype=np.float64)
        blocks[:, first:last] = np.square(piece).reshape(song.shape[0], last - first, stride).sum(axis=2)
    cumulative = np.concatenate([np.zeros((song.shape[0], 1)), np.cumsum(blocks, axis=1)], axis=1)
    energy = cumulative[:, per_frame:] - cumulative[:, :-per_frame]
    return np.sqrt(np.maximum(energy, 0.0)) / length


def valid_starts(song, length, threshold, rows=None):
    """Start samples (on the grid) of every frame in which no source (of ``rows``) is silent."""
    norms = frame_norms(song, length, frame_stride(length))
    norms = norms[rows] if rows is not None else norms
    keep = (norms >= threshold).all(axis=0) if norms.shape[1] else np.zeros(0, dtype=bool)
    return np.flatnonzero(keep) * frame_stride(length)


def silent_rows(song, length, threshold, rows=None):
    """Positions (in ``rows``) of the sources silent in every frame of the song: what a warning or an error
    names when the song serves no frame."""
    norms = frame_norms(song, length, frame_stride(length))
    norms = norms[rows] if rows is not None else norms
    return [k for k in range(norms.shape[0]) if not (norms[k] >= threshold).any()]


class SongArrays:
    """The cached songs, rows ``rows`` of each (the selected sources). Opened lazily in each process:
    a pickled memory map would be copied whole into every DataLoader worker, a path is not."""

    def __init__(self, paths, rows):
        self.paths, self.rows = [str(p) for p in paths], list(rows)
        self._arrays = None

    def array(self, song):
        """The whole cached song, every stored source: a read-only memory map."""
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        return self._arrays[song]

    def item(self, song, start, length, index):
        # Slice time first: fancy-indexing rows of a memory map would read the whole song.
        frame = np.array(self.array(song)[:, start:start + length], dtype=np.float32)[self.rows]
        sources = torch.from_numpy(frame)
        return {"sources": sources, "mix": sources.mean(dim=0), "index": index}

    def valid_starts(self, song, length, threshold):
        return valid_starts(self.array(song), length, threshold, self.rows)

    def silent_sources(self, song, length, threshold):
        return silent_rows(self.array(song), length, threshold, self.rows)

    def n_samples(self, song):
        return self.array(song).shape[1]

    def __len__(self):
        return len(self.paths)

    def __getstate__(self):
        return {"paths": self.paths, "rows": self.rows, "_arrays": None}


class RandomFrames(Dataset):
    """Training: ``frames_per_song`` random non-silent frames per song and epoch. Item i belongs to
    song i // frames_per_song; its start is drawn from torch's generator, which Lightning seeds
    (``seed_everything(..., workers=True)``), so runs are reproducible."""

    def __init__(self, songs, starts, length, frames_per_song):
        self.songs, self.starts = songs, [torch.as_tensor(s, dtype=torch.long) for s in starts]
        self.length, self.frames_per_song = length, frames_per_song

    def __len__(self):
        return len(self.starts) * self.frames_per_song

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        song = index // self.frames_per_song
        starts = self.starts[song]
        start = int(starts[torch.randint(len(starts), ())])
        return self.songs.item(song, start, self.length, index)


class FixedFrames(Dataset):
    """Evaluation: the non-silent frames on a grid of hop ``length``, taken round-robin across songs
    (frame 0 of every song, then frame 1, ...) so that the first n items cover as many songs as
    possible; capped at ``max_items``. The list never changes between runs."""

    def __init__(self, songs, starts, length, max_items=None):
        self.songs, self.length = songs, length
        per_song = [[int(s) for s in song_starts if s % length == 0] for song_starts in starts]
        order = []
        for rank in range(max((len(s) for s in per_song), default=0)):
            order += [(song, s[rank]) for song, s in enumerate(per_song) if rank < len(s)]
        self.frames = order[:max_items] if max_items is not None else order

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        song, start = self.frames[index]
        return self.songs.item(song, start, self.length, index)
