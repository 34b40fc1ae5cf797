"""``make demo-data``: a small multitrack set rendered from public-domain scores, in the MUSDB18-HQ and
Slakh2100 layouts, built offline and the same bytes on every run (datamodules/demo_data/).

    python -m experiments.demo_data [root=data/demo] [songs=48] [seconds=30] [seed=0] [jobs=2]

Then ``MUSDB_ROOT=<root>/musdb`` or ``SLAKH_ROOT=<root>/slakh`` trains on it like on the real datasets.
Needs the ``fluidsynth`` program and the FluidR3_GM soundfont (Debian: fluidsynth, fluid-soundfont-gm).
"""
import os
import sys
import time
from pathlib import Path

from datamodules.demo_data.build import DemoDataError, build_demo_data
from datamodules.demo_data.fluidsynth import RendererMissing

DEFAULTS = {"root": "data/demo", "songs": "48", "seconds": "30", "seed": "0", "jobs": str(min(2, os.cpu_count() or 1))}


def parse(argv):
    """The options as typed values; DemoDataError naming the first bad one."""
    options = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise DemoDataError(f"unknown option {arg!r}; known: {', '.join(f'{k}=...' for k in DEFAULTS)}")
        options[key] = value
    try:
        typed = {"root": Path(options["root"]), "songs": int(options["songs"]), "seconds": float(options["seconds"]),
                 "seed": int(options["seed"]), "jobs": int(options["jobs"])}
    except ValueError as error:
        raise DemoDataError(f"songs, seed and jobs must be whole numbers and seconds a number: {error}") from None
    if not options["root"]:
        raise DemoDataError("root (DEMO_ROOT) is empty")
    if typed["songs"] < 1 or typed["seconds"] <= 0 or typed["jobs"] < 1:
        raise DemoDataError("songs and jobs must be at least 1 and seconds positive")
    return typed


def folder_size(root):
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def main(argv):
    started = time.perf_counter()
    try:
        options = parse(argv)
        marker = build_demo_data(**options, log=lambda message: print(message, flush=True))
    except (DemoDataError, RendererMissing) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    root = options["root"]
    sizes = {split: len(numbers) for split, numbers in marker["splits"].items()}
    print(f"demo set in {root}: {sizes['train']} train, {sizes['validation']} validation, {sizes['test']} test songs; "
          f"{folder_size(root) / 1e6:.0f} MB; {time.perf_counter() - started:.0f} s")
    print(f"  MUSDB_ROOT={root / 'musdb'}   SLAKH_ROOT={root / 'slakh'}   (licences: {root / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
