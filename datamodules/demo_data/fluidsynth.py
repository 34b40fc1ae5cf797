"""Rendering a MIDI file to audio with the FluidSynth program and a General MIDI soundfont.

FluidSynth writes raw 32-bit floats here: no clipping and no dither (its 16-bit output adds dither noise),
so the only rounding is ours, later, when the stems are stored. One process renders one stem, single
threaded, so the bytes do not depend on scheduling.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
SAMPLE_RATE = 44100
INSTALL_HINT = ("sudo apt-get install -y --no-install-recommends fluidsynth fluid-soundfont-gm "
                "(make demo-data does this itself when run as root)")


class RendererMissing(RuntimeError):
    """FluidSynth or the soundfont is not installed."""


def soundfont_path():
    return Path(os.environ.get("DEMO_SOUNDFONT", SOUNDFONT))


def find_renderer():
    """(fluidsynth executable, soundfont); RendererMissing saying how to install what is missing."""
    program = shutil.which("fluidsynth")
    if program is None:
        raise RendererMissing(f"fluidsynth is not on PATH: {INSTALL_HINT}")
    soundfont = soundfont_path()
    if not soundfont.is_file():
        raise RendererMissing(f"the General MIDI soundfont {soundfont} is missing: {INSTALL_HINT} "
                              "(or set DEMO_SOUNDFONT to another .sf2)")
    return program, soundfont


def renderer_version(program):
    out = subprocess.run([program, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def render(midi, frames, program, soundfont, rate=SAMPLE_RATE):
    """[frames, 2] float32 audio of the MIDI file's bytes, cut or zero-padded to ``frames``."""
    with tempfile.TemporaryDirectory(prefix="demo_render_") as folder:
        midi_path, raw_path = Path(folder) / "stem.mid", Path(folder) / "stem.raw"
        midi_path.write_bytes(midi)
        command = [program, "-n", "-i", "-q", "-r", str(rate), "-O", "float", "-T", "raw", "-E", "little",
                   "-o", "synth.cpu-cores=1", "-F", str(raw_path), str(soundfont), str(midi_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not raw_path.is_file():
            raise RuntimeError(f"fluidsynth failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
        audio = np.fromfile(raw_path, dtype="<f4")
    audio = audio[:len(audio) - len(audio) % 2].reshape(-1, 2)
    if not np.isfinite(audio).all():
        raise RuntimeError("fluidsynth rendered NaN or infinite samples")
    out = np.zeros((frames, 2), dtype=np.float32)
    out[:min(frames, len(audio))] = audio[:frames]
    return out
