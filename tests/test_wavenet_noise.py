"""The smoothed WaveNet follows the noise level it was fine-tuned at (component width sqrt(s^2 + sigma^2))."""
import math

import pytest
import torch
from torch import nn

from datamodules.toy_waveforms import toy_example
from experiments.run_layout import basis_sigmas
from lightning_modules.samplers.langevin import LangevinSeparator, basis_levels
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.samplers.level_score import LevelScore
from lightning_modules.nn.wavenet import WaveNet, WaveNetConfig
from lightning_modules.prior_module import PriorModule

SOURCES = ["sine", "square"]
SMOOTHED = {"name": "wavenet", "n_blocks": 1, "n_layers": 4, "width": 8, "n_classes": 32, "likelihood": "smoothed"}
FLOW = {"name": "flowavenet", "n_blocks": 2, "n_flows": 2, "n_layers": 2, "width": 8}


@pytest.fixture
def one_thread():
    # These tensors are tiny: a second thread only adds contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_batch(seeds, length=256):
    return torch.stack([toy_example(seed, SOURCES, length, 16000) for seed in seeds])  # [B, N, T]


def train_noisy(model, sigma, steps=40, lr=3e-3):
    torch.manual_seed(0)
    module = PriorModule(model=model, sources=SOURCES, noise_sigma=sigma, lr=lr)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for step in range(steps):
        clean = toy_batch(range(8 * step, 8 * step + 8))
        loss = -module.log_prob(module.add_noise(clean)).mean(dim=0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


def test_noise_finetuned_smoothed_wavenet_scores_like_a_flow_on_noisy_data(one_thread):
    sigma = 0.359
    clean = toy_batch(range(10_000, 10_008))
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    assert (noisy.abs() > 1).float().mean() > 0.2  # a good part of the data lies outside the bins' range
    # 256 bins as in real runs: a one-bin width (2/255) is where the noiseless width costs the most.
    smoothed_256 = dict(SMOOTHED, n_classes=256)
    wavenet, flow = (train_noisy(model, sigma).log_prob(noisy).mean().item() for model in (smoothed_256, FLOW))
    print(f"nats/sample on x + N(0, {sigma}^2): smoothed WaveNet {wavenet:.3f}, FloWaveNet {flow:.3f}")
    assert wavenet > -3.0, wavenet  # the noise alone has entropy 0.5 log(2 pi e sigma^2) = 0.39 nats
    assert abs(wavenet - flow) < 3.0, (wavenet, flow)


class Recorder(nn.Module):
    """Passes a prior through and keeps the largest |x| it is asked to score: overall and at the last step."""

    def __init__(self, prior):
        super().__init__()
        self.prior, self.largest, self.last = prior, 0.0, 0.0

    def log_prob(self, x):
        self.last = x.detach().abs().max().item()
        self.largest = max(self.largest, self.last)
        return self.prior.log_prob(x)


def test_basis_stays_bounded_and_fits_the_mixture_at_every_level(one_thread):
    sigmas = basis_sigmas()[::-1]  # 1.0 ... 0.01
    levels = basis_levels(sigmas, delta=2e-5, steps=100)
    priors = []
    for sigma in sigmas:
        torch.manual_seed(0)
        priors.append(Recorder(PriorModule(model=SMOOTHED, sources=SOURCES, noise_sigma=sigma).prior.eval()))
    mix = toy_batch([3], length=64).mean(dim=1)  # [1, T]
    separator = LangevinSeparator(LevelScore(zip(sigmas, priors)), levels, mixing_weights("mean", len(SOURCES)))
    x, trace = separator(mix, n_chains=2, seeds=[0])
    errors = trace["mix_error"][0].view(len(levels), -1)  # [level, step]
    end_errors = errors[:, -10:].mean(dim=1)
    for sigma, prior, error, end in zip(sigmas, priors, errors, end_errors):
        print(f"sigma {sigma}: max|x| {prior.largest:.3g} (last step {prior.last:.3g}), "
              f"mix error {error[0]:.3g} -> {end:.3g}")
    assert torch.isfinite(x).all() and separator.nonfinite_steps == 0
    # At sigma = 1 the prior is x + N(0, 1), so |x| of 4 or 5 is expected there; without the noise in
    # the width the chains went to 1e19.
    assert max(prior.largest for prior in priors) < 8.0, [prior.largest for prior in priors]
    for sigma, prior in zip(sigmas, priors):
        assert prior.last < 1 + 6 * math.sqrt((2 / 31) ** 2 + sigma**2), (sigma, prior.last)
    # From the uniform start, the first level's chains are already about as far from the mix as its
    # posterior (gamma = 1) allows; every later level starts at the previous gamma and improves on it.
    assert end_errors[0] < sigmas[0] ** 2, end_errors[0]
    assert (end_errors[1:] < errors[1:, 0]).all(), (errors[:, 0], end_errors)
    assert end_errors[-1] < 2 * sigmas[-1] ** 2, end_errors[-1]


def tiny_smoothed(noise_sigma):
    torch.manual_seed(0)
    net = WaveNet(1, WaveNetConfig(n_blocks=2, n_layers=3, width=8, n_classes=16, likelihood="smoothed"))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.noise_sigma = noise_sigma
    return net.eval()


def mixture_of_bins(net, x, width):
    """log p(x_t | past) [B, T] written out: sum_k softmax_k N(x_t; c_k, width^2)."""
    log_weights = torch.log_softmax(net.logits(x), dim=2)[:, 0]  # [B, K, T]
    normal = torch.distributions.Normal(net.centres.view(1, -1, 1), width)
    return torch.logsumexp(log_weights + normal.log_prob(x[:, 0].unsqueeze(1)), dim=1)


@pytest.mark.parametrize("noise_sigma", [0.0, 0.359, 1.0])
def test_noisy_smoothed_density_is_the_bins_widened_by_the_noise(noise_sigma):
    net = tiny_smoothed(noise_sigma)
    s = 2.0 / 15  # one bin width, the default smoothing
    width = math.sqrt(s**2 + noise_sigma**2)
    past = torch.rand(1, 1, 12, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    grid = torch.linspace(-4, 4, 4001)
    x = torch.cat([past.expand(len(grid), -1, -1), grid.view(-1, 1, 1)], dim=2)
    with torch.no_grad():
        # log p(x_12 | past) = 13 * mean log p(x_0..x_12) - 12 * mean log p(x_0..x_11), by the chain rule.
        last_step = 13 * net.log_prob(x)[:, 0] - 12 * net.log_prob(past)[0, 0]
        expected = mixture_of_bins(net, x, width)
    assert torch.trapezoid(torch.exp(last_step), grid).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(last_step, expected[:, -1], atol=1e-3)
    assert torch.allclose(net.log_prob(x[:64])[:, 0], expected[:64].mean(dim=1), atol=1e-5)
    # The noise level lives outside the state_dict, so checkpoints of either kind load into the other.
    assert set(net.state_dict()) == set(tiny_smoothed(0.0).state_dict())


def test_sampling_draws_with_the_widened_bins():
    net = tiny_smoothed(0.359)
    index = torch.full((20_000,), 7)
    values = net.class_to_value(index, torch.Generator().manual_seed(0))
    assert values.mean().item() == pytest.approx(net.centres[7].item(), abs=0.02)
    assert values.std().item() == pytest.approx(math.sqrt((2.0 / 15) ** 2 + 0.359**2), rel=0.03)
