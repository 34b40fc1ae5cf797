"""The separation metrics on hand-built signals whose scores are known in closed form: the windowed
SI-SDRi protocol (which windows are kept, the value), the Average baseline's scale, and what museval's
BSSEval v4 SDR measures (not scale invariant, unlike SI-SDR)."""
import math

import numpy as np
import pytest
import torch

from lightning_modules.metrics.separation_metrics import (
    average_baseline, bss_sdr, si_sdr, si_sdr_of_mix, window_starts, windowed_si_sdri,
)

WINDOW, HOP = 400, 200


def tone(period, length):
    """A sine of an integer period: zero-mean and orthogonal to another such tone over any stretch holding
    whole periods of both (every hop of 200 samples holds 10 periods of 20 and 8 of 25)."""
    return torch.sin(2 * math.pi * torch.arange(length, dtype=torch.float64) / period)


def per_hop(values, length):
    """A gain constant over each hop-long piece."""
    return torch.tensor(values, dtype=torch.float64).repeat_interleave(HOP)[:length]


def two_sources(length=1200, a=0.5, active_pieces=3):
    """s1 everywhere; s2 (amplitude a) in the first ``active_pieces`` hops only, silent after."""
    s1 = tone(20, length)
    s2 = a * tone(25, length) * per_hop([1.0] * active_pieces + [0.0] * 10, length)
    return torch.stack([s1, s2])


def test_windowed_si_sdri_keeps_windows_with_two_active_sources_and_averages_them():
    references = two_sources()
    mix = references.sum(dim=0)
    b, d = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5], 0.3
    # est1 = s1 + b(t) s2: s1 and b(t) s2 stay orthogonal in every window (b is constant per hop), so in a
    # window made of pieces p the SI-SDR is 10 log10(||s1||^2 / sum_p b_p^2 ||s2||_p^2), and the mix's the
    # same with every b_p = 1. est2 = s2 + d s1 scores SI-SDRi = -20 log10 d wherever s2 is active.
    estimates = torch.stack([references[0] + per_hop(b, 1200) * references[1], references[1] + d * references[0]])
    scores, kept, total = windowed_si_sdri(estimates, references, mix, WINDOW, HOP)
    # Windows start at 0, 200, 400, 600, 800; s2 is silent from 600 on, so only the first three are kept.
    assert (kept, total) == (3, 5)
    expected_1 = [10 * math.log10(2 / (b[0] ** 2 + b[1] ** 2)),  # pieces 0, 1: s2 in both
                  10 * math.log10(2 / (b[1] ** 2 + b[2] ** 2)),  # pieces 1, 2
                  -20 * math.log10(b[2])]  # pieces 2, 3: s2 in piece 2 only
    assert float(scores[0]) == pytest.approx(sum(expected_1) / 3, abs=1e-6)
    assert float(scores[1]) == pytest.approx(-20 * math.log10(d), abs=1e-6)
    # Keeping every window (threshold 0) would also average in the two windows without s2, where the
    # estimate and the mix are both s1 itself: an improvement of about 0 dB that drags the mean down.
    every, kept, total = windowed_si_sdri(estimates, references, mix, WINDOW, HOP, threshold=0.0)
    assert (kept, total) == (5, 5) and float(scores[0]) - float(every[0]) > 1.0


def test_a_source_is_inactive_below_the_silence_threshold_on_norm_over_length():
    s1 = tone(20, WINDOW)
    for level, expected_kept in ((1e-5, 0), (2e-5, 1)):
        # ||c sin||_2 / L = c sqrt(L / 2) / L: this amplitude puts s2 at exactly `level`, while its RMS
        # (c / sqrt 2, about 20x the threshold) would call it active under an RMS rule.
        c = level * WINDOW / math.sqrt(WINDOW / 2)
        references = torch.stack([s1, c * tone(25, WINDOW)])
        mix = references.sum(dim=0)
        scores, kept, total = windowed_si_sdri(references + 0.1 * mix, references, mix, WINDOW, HOP,
                                               threshold=1.5e-5)
        assert (kept, total) == (expected_kept, 1)
        assert torch.isnan(scores).all() == (expected_kept == 0)


def test_an_item_shorter_than_a_window_is_one_window_of_the_whole_item_and_the_tail_is_dropped():
    assert window_starts(300, WINDOW, HOP) == ([0], 300)
    assert window_starts(WINDOW, WINDOW, HOP) == ([0], WINDOW)
    assert window_starts(1100, WINDOW, HOP) == ([0, 200, 400, 600], WINDOW)  # [1000, 1100) is not scored
    references = two_sources(length=300, active_pieces=2)
    mix = references.sum(dim=0)
    estimates = references + 0.2 * torch.stack([references[1], references[0]])
    scores, kept, total = windowed_si_sdri(estimates, references, mix, WINDOW, HOP)
    assert (kept, total) == (1, 1)
    whole = si_sdr(estimates, references) - si_sdr_of_mix(mix, references)
    assert torch.allclose(scores, whole, atol=1e-9)
    with pytest.raises(ValueError, match="positive"):
        window_starts(1000, 0, HOP)


def test_average_baseline_is_the_mix_over_n_alpha_k():
    mix = torch.randn(2, 64)
    assert torch.equal(average_baseline(mix, torch.tensor([0.5, 0.5])), mix.unsqueeze(1).expand(2, 2, 64))
    assert torch.allclose(average_baseline(mix, torch.ones(2)), mix.unsqueeze(1).expand(2, 2, 64) / 2)
    weighted = average_baseline(mix, torch.tensor([0.2, 0.6]))
    assert torch.allclose(weighted[:, 0], mix / 0.4) and torch.allclose(weighted[:, 1], mix / 1.2)


def test_museval_sdr_is_the_snr_of_the_estimate_and_not_scale_invariant():
    rate, seconds = 16000, 4
    t = np.arange(rate * seconds) / rate
    references = torch.from_numpy(np.stack([np.sin(2 * np.pi * 220 * t) * (0.5 + 0.4 * np.sin(2 * np.pi * 0.7 * t)),
                                            0.3 * np.sign(np.sin(2 * np.pi * 330 * t))]))
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(references.shape))
    snr_db = 10.0
    noise *= references.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True) / 10 ** (snr_db / 20)
    estimates = references + noise
    sdr = bss_sdr(estimates, references, rate)
    assert torch.allclose(sdr, torch.full((2,), snr_db, dtype=torch.float64), atol=1.0), sdr
    # Halving the estimate leaves SI-SDR alone but costs SDR several dB.
    assert torch.allclose(si_sdr(estimates / 2, references), si_sdr(estimates, references), atol=1e-9)
    assert ((sdr - bss_sdr(estimates / 2, references, rate)) > 3.0).all()
    # A perfect shape at half the level: SDR = 10 log10(||s||^2 / ||s/2 - s||^2) = 20 log10 2 = 6.02 dB.
    assert torch.allclose(bss_sdr(references / 2, references, rate), torch.full((2,), 20 * math.log10(2),
                                                                               dtype=torch.float64), atol=0.1)
