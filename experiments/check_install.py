"""The install proves itself (``make install`` runs this last): ``pip check``, then an import of every package
the project uses, torchaudio's compiled extension and one resampling included, and ffmpeg/ffprobe on PATH for
musdb. A broken environment fails here in seconds with a message, not at test collection. FluidSynth and its
soundfont are optional (only ``make demo-data`` renders with them): their absence is a note, not a failure.

    python -m experiments.check_install
"""
import importlib
import shutil
import subprocess
import sys

# The import name of every package pyproject.toml asks for (and yaml, which the config parser uses).
MODULES = ("torch", "torchaudio", "pytorch_lightning", "torchmetrics", "musdb", "museval", "wandb", "omegaconf",
           "yaml", "soundfile", "matplotlib", "numpy", "pytest", "music21")


def problems():
    found = []
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        found.append(f"pip check: {(check.stdout + check.stderr).strip()}")
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            found.append(f"{tool} is not on PATH (musdb needs it): sudo apt-get install -y ffmpeg")
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # any failure to import is what this check reports
            found.append(f"import {name}: {type(error).__name__}: {error}")
    found += torchaudio_problems()
    return found


def torchaudio_problems():
    """torchaudio's C++ extension must load against this torch (a mismatched pair fails with an undefined symbol)."""
    try:
        import torch
        import torchaudio
        from torchaudio import _extension

        if not _extension._IS_TORCHAUDIO_EXT_AVAILABLE:
            return ["torchaudio's compiled extension is not available"]
        from datamodules.resample import resample

        if resample(torch.ones(441), 44100, 16000).shape[-1] != 160:
            return ["torchaudio resampling gave a wrong length"]
        if torch.__version__.split("+")[0].rsplit(".", 1)[0] != torchaudio.__version__.split("+")[0].rsplit(".", 1)[0]:
            return [f"torch {torch.__version__} and torchaudio {torchaudio.__version__} are not a matching pair"]
    except Exception as error:  # an undefined symbol surfaces as OSError or ImportError
        return [f"torchaudio does not load against torch: {type(error).__name__}: {error}"]
    return []


def main():
    found = problems()
    if found:
        print("error: the environment is broken:\n  " + "\n  ".join(found)
              + "\nReinstall it from the lock file: rm -rf .venv && make install", file=sys.stderr)
        return 1
    import torch
    import torchaudio

    print(f"environment ok: torch {torch.__version__}, torchaudio {torchaudio.__version__}, "
          f"{len(MODULES)} packages import, pip check clean")
    optional_tools_note()
    return 0


def optional_tools_note():
    from datamodules.demo_data.fluidsynth import RendererMissing, find_renderer

    try:
        find_renderer()
    except RendererMissing as error:
        print(f"note: make demo-data will not run until this is fixed: {error}")


if __name__ == "__main__":
    sys.exit(main())
