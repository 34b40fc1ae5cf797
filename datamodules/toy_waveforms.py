"""Toy sources of paper 003 (section 3.1): sine, square, sawtooth and triangle waves.

Per example and source: piano-key index uniform (continuous) in [1, 88], so the frequency is
log-uniform in [27.5, 4186] Hz; amplitude U[0.8, 1.0]; phase U[0, 2 pi]. Each example is drawn
from its own seeded generator, so example i is the same whatever the order, worker or rank.
"""
import math

import torch

TOY_SOURCES = ("sine", "square", "saw", "triangle")
MIN_KEY, MAX_KEY = 1.0, 88.0
MIN_AMPLITUDE, MAX_AMPLITUDE = 0.8, 1.0


def key_to_frequency(key):
    """Piano key number (A4 = 49 = 440 Hz) to frequency in Hz."""
    return 440.0 * 2.0 ** ((key - 49.0) / 12.0)


def check_source_names(names):
    unknown = [name for name in names if name not in TOY_SOURCES]
    if unknown:
        raise ValueError(f"unknown toy source(s) {unknown}; choose from {list(TOY_SOURCES)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"toy sources must be a non-empty list without repeats, got {list(names)}")


def waveform(name, frequency, amplitude, phase, length, sample_rate):
    """One waveform of ``length`` samples; ``phase`` in radians."""
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    cycles = frequency * t + phase / (2 * math.pi)  # position in periods
    fraction = torch.remainder(cycles, 1.0)
    if name == "sine":
        wave = torch.sin(2 * math.pi * cycles)
    elif name == "square":
        wave = torch.where(fraction < 0.5, 1.0, -1.0).double()
    elif name == "saw":
        wave = 2.0 * fraction - 1.0
    elif name == "triangle":
        wave = 1.0 - 4.0 * torch.abs(fraction - 0.5)
    else:
        check_source_names([name])
    return (amplitude * wave).float()


def toy_example(seed, sources, length, sample_rate):
    """Sources [N, T] of one example; parameters are drawn for all four toy sources (in the
    canonical order) so that choosing a subset does not change the others' waveforms."""
    check_source_names(sources)
    generator = torch.Generator().manual_seed(seed)
    params = torch.rand(len(TOY_SOURCES), 3, generator=generator, dtype=torch.float64)
    waves = []
    for name in sources:
        key_u, amp_u, phase_u = params[TOY_SOURCES.index(name)].tolist()
        frequency = key_to_frequency(MIN_KEY + (MAX_KEY - MIN_KEY) * key_u)
        amplitude = MIN_AMPLITUDE + (MAX_AMPLITUDE - MIN_AMPLITUDE) * amp_u
        waves.append(waveform(name, frequency, amplitude, 2 * math.pi * phase_u, length, sample_rate))
    return torch.stack(waves)
