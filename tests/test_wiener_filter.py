import math

import pytest
import torch

from lightning_modules.metrics.separation_metrics import si_sdr
from lightning_modules.samplers.wiener_filter import posterior_wiener, wiener_filter


def tones(length=4096, rate=8000.0, phases=(0.0, 0.0)):
    t = torch.arange(length, dtype=torch.float64) / rate
    return torch.stack([torch.sin(2 * math.pi * 220 * t + phases[0]),
                        0.5 * torch.sin(2 * math.pi * 1760 * t + phases[1])])


@pytest.mark.parametrize("alpha", [[1.0, 1.0], [0.5, 0.5], [0.3, 1.2]])
def test_the_filtered_sources_mix_back_exactly(alpha):
    alpha = torch.tensor(alpha, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 1000, generator=generator, dtype=torch.float64)
    estimates = torch.randn(3, 2, 2, 1000, generator=generator, dtype=torch.float64)  # [B, C, N, T]
    filtered = wiener_filter(mix.unsqueeze(1), estimates, alpha, 256)
    assert filtered.shape == estimates.shape
    residual = mix.unsqueeze(1) - (alpha[:, None] * filtered).sum(dim=-2)
    assert residual.abs().max() < 1e-10


def test_the_mixture_gives_the_waveform_and_the_estimates_only_the_shares():
    # Estimates with each tone's spectrum but a wrong phase (a quarter period off): raw, they score badly;
    # refiltered from the mixture they come back as the true tones.
    sources, alpha = tones(), torch.ones(2, dtype=torch.float64)
    mix = sources.sum(dim=0)
    wrong_phase = tones(phases=(math.pi / 2, math.pi / 2))
    assert si_sdr(wrong_phase, sources).max() < -20
    filtered = wiener_filter(mix, wrong_phase, alpha, 512)
    assert si_sdr(filtered[:, 256:-256], sources[:, 256:-256]).min() > 30
    # Silent estimates: every bin is split equally.
    even = wiener_filter(mix, torch.zeros_like(sources), alpha, 512)
    assert torch.allclose(even, mix.expand(2, -1) / 2, atol=1e-10)


def test_a_window_the_estimates_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="longer than"):
        wiener_filter(torch.zeros(100), torch.zeros(2, 100), torch.ones(2), 256)
    with pytest.raises(ValueError, match="even window"):
        wiener_filter(torch.zeros(100), torch.zeros(2, 100), torch.ones(2), 15)


def test_the_loop_scores_filtered_estimates_but_ranks_the_chains_on_the_samplers_own():
    from lightning_modules.separation import SeparationModule
    from tests.test_mixture_consistency import FixedSeparator

    references = torch.randn(2, 2, 128, generator=torch.Generator().manual_seed(0))
    mix = 0.5 * references.sum(1)
    module = SeparationModule(FixedSeparator(references), ["a", "b"], "fixed", n_chains=3, museval=False,
                              wiener_fft=32)
    module.on_test_epoch_start()
    module.test_step({"mix": mix, "sources": references, "index": torch.arange(2)}, 0)
    rows = {(row["index"], row["method"]): row for row in module.rows}
    separator = module.separator
    filtered = wiener_filter(mix.unsqueeze(1), separator.chains, separator.alpha, 32)
    assert torch.equal(separator.seen, separator.chains)  # the consistency choice saw the unfiltered chains
    for index in range(2):
        assert rows[index, "fixed_selected_of_3"]["chain"] == 1 and rows[index, "fixed_consistent_of_3"]["chain"] == 2
        for method in ("fixed", "fixed_selected_of_3", "fixed_consistent_of_3", "fixed_oracle_of_3"):
            row = rows[index, method]
            assert row["mix_error"] < 1e-10
            expected = si_sdr(filtered[index, row["chain"]], references[index]).mean()
            assert abs(row["si_sdr"] - float(expected)) < 1e-4
    combined = posterior_wiener(mix, separator.chains, separator.alpha, 32)
    for index in range(2):
        row = rows[index, "fixed_posterior_wiener_of_3"]
        assert row["chain"] is None and row["mix_error"] < 1e-10
        assert abs(row["si_sdr"] - float(si_sdr(combined[index], references[index]).mean())) < 1e-4
    assert module.method_names()[-1] == "fixed_posterior_wiener_of_3"
    unfiltered = SeparationModule(separator, ["a", "b"], "fixed", n_chains=3)
    assert not any("posterior_wiener" in name for name in unfiltered.method_names())
    for bad in (-1, 15):  # refused when the loop is built, before any separation work
        with pytest.raises(ValueError, match="0 \\(off\\) or an even window"):
            SeparationModule(separator, ["a", "b"], "fixed", wiener_fft=bad)


def test_the_chains_mean_power_shares_the_mixture_better_than_any_one_chain():
    # Each chain is the truth drowned in its own noise: one chain's masks follow its noise, the mean power over
    # the chains follows the truth, so the combined estimate beats even the best single refiltered chain
    # (15.6 against 14.7 dB, 12.4 on average).
    sources, alpha = tones(), torch.ones(2, dtype=torch.float64)
    mix = sources.sum(dim=0)
    noise = torch.randn(16, 2, sources.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chains = sources + 2.0 * noise  # [C, N, T]
    combined = posterior_wiener(mix, chains, alpha, 512)
    assert ((mix - combined.sum(dim=0)).abs().max()) < 1e-10
    single = torch.stack([si_sdr(wiener_filter(mix, chain, alpha, 512), sources).mean() for chain in chains])
    score = si_sdr(combined, sources).mean()
    assert score > single.max() and score > single.mean() + 2
    assert torch.allclose(posterior_wiener(mix, chains[:1], alpha, 512), wiener_filter(mix, chains[0], alpha, 512))
    with pytest.raises(ValueError, match="needs a window"):
        posterior_wiener(mix, chains, alpha, 0)
