"""The decoded-stem cache: reuse, invalidation when a source changes, recovery from a half-written
entry, and one decode when several processes ask at once."""
import multiprocessing
import os
import time

import numpy as np

from datamodules.stem_cache import StemCache


def make_source(path, value):
    np.save(path, np.full((2, 100), value, dtype=np.float32))
    return path


def counting_decode(path, log):
    def decode():
        with open(log, "a") as stream:
            stream.write("decoded\n")
        time.sleep(0.2)  # long enough for a concurrent reader to arrive mid-build
        return np.load(path) * 2
    return decode


def decode_count(log):
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_cache_is_built_once_then_reused(tmp_path):
    source, log = make_source(tmp_path / "song.npy", 1.0), tmp_path / "log"
    cache = StemCache(tmp_path / "cache")
    first = cache.load([source], 16000, counting_decode(source, log))
    second = cache.load([source], 16000, counting_decode(source, log))
    assert isinstance(second, np.memmap) and second.dtype == np.float32
    assert np.array_equal(first, second) and float(second[0, 0]) == 2.0
    assert decode_count(log) == 1
    # Another rate is another entry.
    cache.load([source], 22050, counting_decode(source, log))
    assert decode_count(log) == 2


def test_a_changed_source_file_rebuilds_the_entry(tmp_path):
    source, log = make_source(tmp_path / "song.npy", 1.0), tmp_path / "log"
    cache = StemCache(tmp_path / "cache")
    cache.load([source], 16000, counting_decode(source, log))
    make_source(source, 3.0)
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    rebuilt = cache.load([source], 16000, counting_decode(source, log))
    assert float(rebuilt[0, 0]) == 6.0 and decode_count(log) == 2


def test_an_entry_without_its_metadata_is_rebuilt(tmp_path):
    source, log = make_source(tmp_path / "song.npy", 1.0), tmp_path / "log"
    cache = StemCache(tmp_path / "cache")
    cache.load([source], 16000, counting_decode(source, log))
    next((tmp_path / "cache").glob("*.json")).unlink()  # as if killed between the array and its json
    assert float(cache.load([source], 16000, counting_decode(source, log))[1, 5]) == 2.0
    assert decode_count(log) == 2


def load_in_process(root, source, log, out):
    array = StemCache(root).load([source], 16000, counting_decode(source, log))
    np.save(out, np.asarray(array))


def test_concurrent_processes_decode_once(tmp_path):
    source, log = make_source(tmp_path / "song.npy", 1.0), tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"out{i}.npy" for i in range(3)]
    workers = [context.Process(target=load_in_process, args=(tmp_path / "cache", source, log, out)) for out in outs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert decode_count(log) == 1
    assert all(float(np.load(out)[0, 0]) == 2.0 for out in outs)
