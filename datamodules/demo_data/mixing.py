"""Levels and exact sums: each stem brought to one loudness, one gain per song against clipping, then
16-bit integers, and every mixture the integer sum of its stems.

Summing integers (not floats that are rounded again on writing) is what makes a stored mixture equal, to
the last bit, the sum of its stored stems as a reader decodes them (PCM_16 decodes as k / 32768, and sums
of those are exact in float32 and float64).
"""
import numpy as np

FULL_SCALE = 32768  # PCM_16 reads back as integer / 32768
TARGET_DB = -24.0  # every stem's RMS over its sounding blocks
SILENCE_DB = -60.0  # a block quieter than this (RMS, full scale 1) is a rest, not part of the level
PEAK = 0.89  # no stored signal (stem, musdb group, mixture) goes above this, so nothing clips
BLOCK_SECONDS = 0.05


def active_rms(audio, rate):
    """RMS of ``audio`` [T, C] over its 50 ms blocks louder than SILENCE_DB; 0 for a silent stem."""
    block = max(1, int(rate * BLOCK_SECONDS))
    usable = len(audio) - len(audio) % block
    if usable == 0:
        return 0.0
    power = np.square(audio[:usable].astype(np.float64)).mean(axis=1).reshape(-1, block).mean(axis=1)
    sounding = power > 10 ** (SILENCE_DB / 10)
    return float(np.sqrt(power[sounding].mean())) if sounding.any() else 0.0


def loudness_gains(stems, rate):
    """The gain that brings each stem's sounding RMS to TARGET_DB (0 for a silent stem, which stays silent)."""
    target = 10 ** (TARGET_DB / 20)
    return [target / rms if rms > 0 else 0.0 for rms in (active_rms(stem, rate) for stem in stems)]


def peak(audio):
    return float(np.abs(audio).max()) if audio.size else 0.0


def to_integers(stems, groups, rate):
    """int32 arrays [T, C] in the int16 range, one per stem: each at TARGET_DB, then all scaled by one song gain
    so that no stem, no sum of one ``groups`` label (musdb's ``other``) and not the mixture exceeds PEAK."""
    levelled = [stem.astype(np.float64) * gain for stem, gain in zip(stems, loudness_gains(stems, rate))]
    sums = [sum(s for s, g in zip(levelled, groups) if g == label) for label in sorted(set(groups))]
    loudest = max([peak(s) for s in levelled] + [peak(s) for s in sums if np.ndim(s)] + [peak(sum(levelled))])
    song_gain = min(1.0, PEAK / loudest) if loudest > 0 else 1.0
    integers = [np.rint(s * song_gain * FULL_SCALE).astype(np.int32) for s in levelled]
    for values in integers:
        np.clip(values, -FULL_SCALE, FULL_SCALE - 1, out=values)  # a no-op below PEAK; kept as a guard
    return integers


def exact_sum(integers):
    """The integer sum of stems, checked to fit 16 bits (so storing it changes nothing)."""
    total = np.sum(np.stack(integers), axis=0, dtype=np.int64)
    if total.size and (total.max() > FULL_SCALE - 1 or total.min() < -FULL_SCALE):
        raise ValueError("a mixture would clip; lower mixing.PEAK")
    return total.astype(np.int16)


def to_mono(values):
    """A stereo integer stem downmixed to mono integers ((left + right) / 2, rounded down)."""
    return ((values[:, 0].astype(np.int64) + values[:, 1]) >> 1).astype(np.int16)
