"""Reading a user's audio file (any rate, any channel count) and writing WAVs atomically.

Audio is read with ``soundfile`` (not ``torchaudio.load``, which needs FFmpeg/torchcodec) and resampled
by ``datamodules.resample``.
"""
import math
from pathlib import Path

import numpy as np
import soundfile
import torch

from datamodules.atomic_io import atomic_write
from datamodules.resample import resample


class AudioFileError(ValueError):
    pass


def read_mono(path, sample_rate, min_seconds=0.1):
    """Audio file -> (mono float32 tensor [T] at ``sample_rate``, notes on what was converted)."""
    if not Path(path).is_file():
        raise AudioFileError(f"mixture file {path} does not exist (or is not a file)")
    if Path(path).stat().st_size == 0:
        raise AudioFileError(f"mixture file {path} is empty (0 bytes); give a WAV/FLAC/OGG file with audio in it")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [T, channels]
    except (RuntimeError, soundfile.LibsndfileError, TypeError) as error:
        raise AudioFileError(
            f"cannot read {path} as audio ({error}); give a WAV/FLAC/OGG file (soundfile formats)"
        ) from None
    notes = []
    if data.shape[0] == 0:
        raise AudioFileError(f"{path} contains no audio samples")
    if not np.isfinite(data).all():
        raise AudioFileError(f"{path} contains NaN or infinite samples; fix or re-export the file")
    if data.shape[1] > 1:
        notes.append(f"downmixed {data.shape[1]} channels to mono (their mean)")
    audio = torch.from_numpy(data.mean(axis=1))
    if rate != sample_rate:
        notes.append(f"resampled from {rate} Hz to the priors' {sample_rate} Hz")
        audio = resample(audio, rate, sample_rate)
    needed = math.ceil(min_seconds * sample_rate)
    if audio.shape[0] < needed:
        raise AudioFileError(
            f"{path} is too short: {audio.shape[0] / sample_rate:.3f} s at {sample_rate} Hz, "
            f"at least {min_seconds} s is needed"
        )
    return audio.contiguous(), notes


def write_wav(path, audio, sample_rate):
    """Float WAV (no clipping of the estimates), written atomically."""
    data = np.asarray(torch.as_tensor(audio).detach().float().cpu())
    return atomic_write(path, lambda stream: soundfile.write(stream, data, sample_rate, format="WAV", subtype="FLOAT"),
                        binary=True)
