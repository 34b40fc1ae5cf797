import pytest
import torch
import torchaudio.functional as AF

from lightning_modules.nn.mu_law import mu_law_decode, mu_law_encode
from lightning_modules.nn.wavenet import WaveNet, WaveNetConfig


def tiny_wavenet(likelihood="mulaw", n_priors=2, seed=0, n_classes=16):
    torch.manual_seed(seed)
    net = WaveNet(n_priors, WaveNetConfig(n_blocks=2, n_layers=3, width=8, n_classes=n_classes,
                                          likelihood=likelihood))
    with torch.no_grad():  # perturb every weight so no test passes by a lucky (e.g. zero) initialisation
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_mu_law_matches_torchaudio():
    x = torch.linspace(-1, 1, 2001)
    assert torch.equal(mu_law_encode(x), AF.mu_law_encoding(x, 256))
    classes = torch.arange(256)
    assert torch.allclose(mu_law_decode(classes), AF.mu_law_decoding(classes, 256), atol=1e-6)
    assert torch.equal(mu_law_encode(mu_law_decode(classes)), classes)  # round trip


@pytest.mark.parametrize("likelihood", ["mulaw", "smoothed"])
def test_causality(likelihood):
    net = tiny_wavenet(likelihood)
    x = torch.rand(1, 2, 40) * 1.6 - 0.8
    x.requires_grad_(True)
    t = 20
    logits = net.logits(x)
    (grad,) = torch.autograd.grad(logits[0, :, :, t].sum(), x, retain_graph=True)
    assert grad[..., t:].abs().max() == 0  # the prediction of x_t never sees x_t or later
    assert grad[..., :t].abs().sum() > 0
    (grad_prior_0,) = torch.autograd.grad(logits[0, 0, :, t].sum(), x)
    assert grad_prior_0[:, 1].abs().max() == 0  # prior 0 never sees source 1


def test_smoothed_likelihood_normalises():
    net = tiny_wavenet("smoothed", n_priors=1)
    past = torch.rand(1, 1, 12) * 1.6 - 0.8
    grid = torch.linspace(-1.6, 1.6, 6401)
    # log p(x_12 | past) = 13 * mean log p(x_0..x_12) - 12 * mean log p(x_0..x_11), by the chain rule.
    x = torch.cat([past.expand(len(grid), -1, -1), grid.view(-1, 1, 1)], dim=2)
    last_step = 13 * net.log_prob(x)[:, 0] - 12 * net.log_prob(past)[0, 0]
    integral = torch.trapezoid(torch.exp(last_step), grid)
    assert integral.item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("likelihood", ["mulaw", "smoothed"])
def test_log_prob_gradient_exists_and_is_finite(likelihood):
    net = tiny_wavenet(likelihood)
    x = (torch.rand(2, 2, 64) * 1.8 - 0.9).requires_grad_(True)
    log_prob = net.log_prob(x)
    assert log_prob.shape == (2, 2)
    (grad,) = torch.autograd.grad(log_prob.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_mulaw_log_prob_is_the_categorical_of_the_target_class():
    net = tiny_wavenet("mulaw", n_classes=256)
    x = torch.rand(1, 2, 30) * 2 - 1
    log_probs = torch.log_softmax(net.logits(x), dim=2)
    target = mu_law_encode(x)
    expected = torch.stack([log_probs[0, g, target[0, g], torch.arange(30)] for g in range(2)]).mean(dim=1)
    assert torch.allclose(net.log_prob(x)[0], expected, atol=1e-6)
    assert (net.log_prob(x) <= 0).all()


@pytest.mark.parametrize("likelihood", ["mulaw", "smoothed"])
def test_step_by_step_generation_matches_batch_forward(likelihood):
    net = tiny_wavenet(likelihood)
    inputs = torch.rand(3, 2, 50) * 2 - 1
    batch_logits = net.network(inputs)
    caches = net.empty_caches(3)
    steps = [net.network(inputs[..., t : t + 1], caches) for t in range(50)]
    assert torch.allclose(torch.cat(steps, dim=3), batch_logits, atol=1e-5)
    # Chunks of several samples through the same queues agree too.
    caches = net.empty_caches(3)
    chunks = [net.network(inputs[..., t : t + 10], caches) for t in range(0, 50, 10)]
    assert torch.allclose(torch.cat(chunks, dim=3), batch_logits, atol=1e-5)


def test_cached_and_uncached_sampling_agree():
    net = tiny_wavenet("mulaw")
    cached = net.sample(2, 30, cached=True, generator=torch.Generator().manual_seed(1))
    uncached = net.sample(2, 30, cached=False, generator=torch.Generator().manual_seed(1))
    assert cached.shape == (2, 2, 30)
    assert torch.allclose(cached, uncached, atol=1e-6)
    assert cached.abs().max() <= 1.0


@pytest.mark.parametrize("likelihood", ["mulaw", "smoothed"])
def test_a_float64_wavenet_samples_in_float64(likelihood):
    net = tiny_wavenet(likelihood).double()
    for cached in (True, False):
        samples = net.sample(2, 5, cached=cached, generator=torch.Generator().manual_seed(0))
        assert samples.dtype == torch.float64 and samples.shape == (2, 2, 5)
