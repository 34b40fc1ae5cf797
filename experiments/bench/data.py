"""``make bench`` (data part): how fast musdb18 songs are decoded into the stem cache, and how fast an
epoch of random training frames is then read from it, in multiples of real time.

    python -m experiments.bench.data [output=runs/bench_data.json] [root=$MUSDB_ROOT] [layouts=hq,stems]
                                     [tracks=8] [seconds=60] [crop_length=16384] [batch_size=2]
                                     [frames_per_song=150] [workers=0,2] [workdir=runs/bench_data_work]

With ``root`` it times the first ``tracks`` training songs of your copy. Without, it writes a synthetic dataset (``tracks`` train songs of ``seconds`` each, 44.1 kHz
stereo) in each layout under ``workdir`` (about 0.8 GB with the defaults): the folder layout and
codecs are the real ones, the music is not. Epochs are timed with the cache files in the page cache
("warm") and after asking the kernel to drop them ("dropped", posix_fadvise DONTNEED). "x real time"
counts the audio of one frame once (not once per source): an epoch of ``frames_per_song`` frames of
``crop_length`` samples per song, at data.sample_rate.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from datamodules.musdb18 import MusdbDataModule
from datamodules.synthetic_layouts import write_musdb_hq, write_musdb_stems
from experiments.bench.common import parse_options, pick_device, write_bench

SAMPLE_RATE = 16000


def make_datamodule(root, cache, options, workers=0):
    return MusdbDataModule(
        root=str(root), sources=["drums", "bass", "other", "vocals"], sample_rate=SAMPLE_RATE,
        crop_length=int(options["crop_length"]), eval_length=int(options["crop_length"]),
        batch_size=int(options["batch_size"]), eval_batch_size=8, frames_per_song=int(options["frames_per_song"]),
        max_tracks=int(options["tracks"]), num_workers=workers, cache_dir=str(cache))


def drop_page_cache(cache):
    """Ask the kernel to forget the cached files' pages, so the next epoch reads them from disk."""
    for path in Path(cache).glob("*.npy"):
        with open(path, "rb") as stream:
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bench_layout(label, root, workdir, options):
    cache = workdir / f"cache_{label}"
    shutil.rmtree(cache, ignore_errors=True)
    result = {"layout": label, "root": str(root)}
    started = time.perf_counter()
    songs, names = make_datamodule(root, cache, options).load_songs("train")
    decode_seconds = time.perf_counter() - started
    audio_seconds = sum(songs.array(i).shape[1] for i in range(len(songs))) / SAMPLE_RATE
    result["decode"] = {"songs": len(names), "audio_seconds": audio_seconds, "wall_seconds": decode_seconds,
                        "x_real_time": audio_seconds / decode_seconds}

    started = time.perf_counter()
    warm = make_datamodule(root, cache, options)
    warm.setup("fit")  # cache hits and the silent-frame index of every song
    result["warm_setup_seconds"] = time.perf_counter() - started

    crop, epochs = int(options["crop_length"]), []
    cases = [(int(w), "warm") for w in options["workers"].split(",")] + [(0, "dropped")]
    for workers, page_cache in cases:
        dm = make_datamodule(root, cache, options, workers)
        dm.setup("fit")
        if page_cache == "dropped":
            drop_page_cache(cache)
        torch.manual_seed(0)
        started, frames = time.perf_counter(), 0
        for batch in dm.train_dataloader():
            frames += batch["sources"].shape[0]
        wall = time.perf_counter() - started
        epochs.append({"num_workers": workers, "page_cache": page_cache, "frames": frames, "wall_seconds": wall,
                       "x_real_time": frames * crop / SAMPLE_RATE / wall,
                       "batches_per_second": frames / int(options["batch_size"]) / wall})
    result["epoch_of_random_frames"] = epochs
    return result


def main(argv):
    options = {"output": "runs/bench_data.json", "root": "", "layouts": "hq,stems", "tracks": "8", "seconds": "60",
               "crop_length": "16384", "batch_size": "2", "frames_per_song": "150", "workers": "0,2",
               "workdir": "runs/bench_data_work", "precision": "32"}
    if not parse_options(argv, options):
        return 2
    workdir = Path(options["workdir"])
    results = []
    if options["root"]:
        results.append(bench_layout("user", Path(options["root"]), workdir, options))
    else:
        writers = {"hq": write_musdb_hq, "stems": write_musdb_stems}
        for label in options["layouts"].split(","):
            root = workdir / f"musdb_{label}"
            if not (root / "train").is_dir():
                print(f"writing a synthetic {label} dataset under {root} ...", flush=True)
                shutil.rmtree(root, ignore_errors=True)
                # +1: the first train song is on musdb's validation list, so not a training song
                writers[label](root, n_train=int(options["tracks"]) + 1, n_test=1, seconds=float(options["seconds"]))
            print(f"benchmarking data loading, {label} layout ...", flush=True)
            results.append(bench_layout(label, root, workdir, options))
            print(json.dumps(results[-1], indent=2), flush=True)
    return write_bench(options, pick_device("cpu"), results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
