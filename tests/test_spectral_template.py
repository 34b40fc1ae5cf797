"""The stationary-Gaussian control (separation.algorithm=template): class spectra from solo crops, the Wiener
posterior mean, its Whittle likelihood, and a run with no trained prior."""
import json

import torch

from experiments.cli import main
from lightning_modules.metrics.separation_metrics import si_sdr
from lightning_modules.samplers.spectral_template import SpectralTemplate, TemplateSeparator, class_power_spectra
from tests.conftest import TINY

N_FFT = 128


def band_crops(n, length, generator):
    """Solo crops [n, 2, length]: source 0 a sum of random low tones (bins 3..10), source 1 of high ones (40..60)."""
    t = torch.arange(length, dtype=torch.float64)

    def tones(low, high):
        bins = torch.randint(low, high, (n, 3), generator=generator).double()
        phases = 2 * torch.pi * torch.rand(n, 3, 1, generator=generator, dtype=torch.float64)
        return torch.sin(2 * torch.pi * bins.unsqueeze(-1) * t / N_FFT + phases).sum(dim=1)
    return torch.stack([tones(3, 11), tones(40, 61)], dim=1).float()


def test_the_template_separates_classes_in_disjoint_bands_and_sums_to_the_mix():
    generator = torch.Generator().manual_seed(0)
    batches = [{"sources": band_crops(16, 512, generator)} for _ in range(4)]
    spectra = class_power_spectra(batches, N_FFT, max_batches=3)
    assert spectra.shape == (2, N_FFT // 2 + 1)
    assert spectra[0, 3:11].sum() > 100 * spectra[0, 40:61].sum()  # each class's power where its tones are
    assert spectra[1, 40:61].sum() > 100 * spectra[1, 3:11].sum()
    references = band_crops(4, 1024, torch.Generator().manual_seed(1))
    alpha = torch.tensor([0.5, 0.5])
    mix = (alpha.view(1, 2, 1) * references).sum(dim=1)
    estimates, trace = TemplateSeparator(SpectralTemplate(spectra, N_FFT), alpha)(mix, 3, [0, 1, 2, 3])
    assert estimates.shape == (4, 3, 2, 1024) and torch.equal(estimates[:, 0], estimates[:, 2])
    assert si_sdr(estimates[:, 0], references).min() > 15
    assert torch.allclose((alpha.view(1, 2, 1) * estimates[:, 0]).sum(dim=1), mix, atol=1e-5)
    assert float(trace["mix_error"].max()) < 1e-10
    swapped = TemplateSeparator(SpectralTemplate(spectra.flip(0), N_FFT), alpha)(mix, 1, [0, 1, 2, 3])[0]
    assert si_sdr(swapped[:, 0], references).max() < -10


def test_each_class_scores_its_own_crops_higher_under_the_whittle_likelihood():
    generator = torch.Generator().manual_seed(2)
    spectra = class_power_spectra([{"sources": band_crops(32, 512, generator)}], N_FFT, max_batches=1)
    crops = band_crops(8, 512, generator)
    own = SpectralTemplate(spectra, N_FFT).log_prob(crops)
    other = SpectralTemplate(spectra.flip(0), N_FFT).log_prob(crops)
    assert own.shape == (8, 2) and (own > other + 1).all()


def test_make_separate_with_the_template_needs_no_trained_prior(tmp_path, capsys):
    common = [*TINY, f"output_root={tmp_path}", "separation.algorithm=template", "separation.n_test=2",
              "separation.n_chains=1", "separation.template_fft=64", "separation.template_batches=2"]
    assert main(["separate", "experiment=toy_flow", *common]) == 0
    out_dir = tmp_path / "toy_flow" / "default" / "separation" / "template_sine-square-saw-triangle"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["config"]["template"]["n_fft"] == 64
    assert set(summary["summary"]) == {"average", "template"}
    assert summary["summary"]["template"]["mix_error"] < 1e-10
    capsys.readouterr()
    assert main(["separate", "experiment=toy_flow", *common, "separation.template_fft=15"]) == 2
    assert "separation.template_fft must be an even window" in capsys.readouterr().err
    assert main(["separate", "experiment=toy_flow", *common, "separation.template_batches=0"]) == 2
    assert "separation.template_batches must be >= 1" in capsys.readouterr().err
    assert main(["separate", "experiment=toy_flow", *common, "separation.template_fft=512"]) != 0
    assert "needs training crops of at least 512 samples" in capsys.readouterr().err
