"""The one place audio changes sample rate. torchaudio serves only this function here: swap its body to move
off torchaudio (which pins torch, README "Set-up") without touching the datamodules."""
import torch
import torchaudio


def resample(wave, from_rate, to_rate):
    """[..., T] float tensor at ``from_rate`` -> the same signal at ``to_rate`` (band-limited sinc interpolation)."""
    from_rate, to_rate = int(from_rate), int(to_rate)
    if from_rate == to_rate:
        return wave
    return torchaudio.functional.resample(torch.as_tensor(wave), from_rate, to_rate)
