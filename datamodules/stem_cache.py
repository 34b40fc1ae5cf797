"""A disk cache of decoded, resampled stems as float32 ``.npy`` memory maps.

Decoding a song (STEMS .mp4 through ffmpeg, or FLAC) and resampling it is far slower than a training
step, so it is done once per (files, sample rate, options, cache version). Random crops then read
straight from the memory map.

* The key hashes the source paths, the rate and any options; the entry also records each source
  file's size and modification time, and a changed source file rebuilds the entry.
* An entry is ``<key>.npy`` plus ``<key>.json``, the json written last, atomically: an entry without
  its json (a build killed half-way) is never used.
* Builders take an exclusive lock on ``<key>.lock``: under DDP (or any concurrent processes) one
  process decodes and the others wait for it, then read its result.
"""
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from datamodules.atomic_io import atomic_write, atomic_write_text

CACHE_VERSION = 1


def fingerprint(paths):
    """(path, size, mtime_ns) of each source file: what makes a cache entry stale."""
    return [[str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


class StemCache:
    def __init__(self, root):
        self.root = Path(root)

    def key(self, paths, sample_rate, options=None):
        text = json.dumps({"paths": [str(Path(p).resolve()) for p in paths], "sample_rate": sample_rate,
                           "options": options or {}, "version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def path(self, paths, sample_rate, options=None):
        return self.root / f"{self.key(paths, sample_rate, options)}.npy"

    def load(self, paths, sample_rate, decode, options=None):
        """The cached array for ``paths`` (read-only memory map), built with ``decode()`` when missing
        or stale. ``decode`` returns a float32 array, e.g. [n_stems, T]."""
        key = self.key(paths, sample_rate, options)
        array, meta = self.root / f"{key}.npy", self.root / f"{key}.json"
        expected = fingerprint(paths)
        if not self.is_valid(meta, array, expected):
            with self.locked(key):
                if not self.is_valid(meta, array, expected):  # another process may have built it meanwhile
                    self.build(array, meta, decode, expected, sample_rate, options)
        return np.load(array, mmap_mode="r")

    @staticmethod
    def is_valid(meta, array, expected):
        if not (meta.is_file() and array.is_file()):
            return False
        try:
            return json.loads(meta.read_text())["sources"] == expected
        except (ValueError, KeyError):
            return False

    @staticmethod
    def build(array, meta, decode, expected, sample_rate, options):
        meta.unlink(missing_ok=True)  # the old entry stops being valid before its array is replaced
        data = np.ascontiguousarray(decode(), dtype=np.float32)
        atomic_write(array, lambda stream: np.save(stream, data), binary=True)
        atomic_write_text(meta, json.dumps({"sources": expected, "sample_rate": sample_rate, "options": options,
                                            "shape": list(data.shape), "version": CACHE_VERSION}))

    @contextmanager
    def locked(self, key):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
