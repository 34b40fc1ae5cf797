"""The LQ-VAE bottleneck and losses (paper 002 section 3-4.2) on hand examples and tiny models."""
import pytest
import torch
from torch import nn

from lightning_modules.nn.lqvae import LQVAE, LQVAEConfig
from lightning_modules.nn.vector_quantizer import VectorQuantizer, perplexity


def quantizer_with(codebook, counts, decay=0.9, threshold=0.0, eps=1e-5):
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], decay=decay, eps=eps, restart_threshold=threshold)
    vq.codebook.copy_(codebook)
    vq.ema_count.copy_(counts)
    vq.ema_sum.copy_(codebook * counts.unsqueeze(1))
    vq.initialised.fill_(True)
    return vq


def test_ema_codebook_update_equals_its_formula_on_a_hand_example():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # A large eps so that the Laplace smoothing visibly matters.
    vq = quantizer_with(codebook, torch.tensor([2.0, 2.0, 2.0]), eps=0.5)
    latents = torch.tensor([[0.1, 0.0], [0.9, 0.1], [1.1, 0.0], [0.2, 0.8]])  # codes 0, 1, 1, 2
    vq.ema_update(latents)
    decay, eps, k = 0.9, 0.5, 3
    counts = torch.tensor([1.0, 2.0, 1.0])
    sums = torch.tensor([[0.1, 0.0], [2.0, 0.1], [0.2, 0.8]])
    n = decay * 2.0 + (1 - decay) * counts
    m = decay * codebook * 2.0 + (1 - decay) * sums
    smoothed = (n + eps) / (n.sum() + k * eps) * n.sum()
    assert torch.allclose(vq.ema_count, n)
    assert torch.allclose(vq.codebook, m / smoothed.unsqueeze(1), atol=1e-6)
    # Code 1 moved towards the mean of its two latents (1.0, 0.05), code 2 towards (0.2, 0.8).
    assert vq.codebook[1, 1] > 0 and vq.codebook[2, 0] > 0


def test_a_dead_code_is_restarted_onto_a_latent_of_the_batch():
    codebook = torch.tensor([[0.0, 0.0], [5.0, 5.0], [1.0, 0.0]])
    vq = quantizer_with(codebook, torch.tensor([5.0, 1.05, 5.0]), threshold=1.0)
    latents = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.0, 0.1]])  # nothing near code 1: its count decays below 1
    torch.manual_seed(0)
    vq.ema_update(latents)
    assert vq.ema_count[1] == 1.0
    assert any(torch.equal(vq.codebook[1], latent) for latent in latents)
    assert torch.equal(vq.ema_sum[1], vq.codebook[1])
    assert vq.dead_codes() == 0
    # The live codes were not moved onto the batch.
    assert vq.ema_count[0] > 1 and vq.ema_count[2] > 1


def test_first_update_initialises_the_codebook_from_the_batch():
    vq = VectorQuantizer(4, 3, restart_threshold=0.0)  # no restarts: only the initialisation can place the codes
    latents = 10 * torch.randn(10, 3)
    vq.ema_update(latents)
    for code in vq.codebook:
        assert torch.min((latents - code).norm(dim=1)) < 1.0  # each code near some latent of the batch


def test_perplexity_counts_codes_in_use():
    assert perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([10.0, 0.0, 0.0, 0.0])).item() == pytest.approx(1.0)


def tiny_lqvae(**overrides):
    options = dict(codebook_size=8, code_dim=4, vq_width=8, strides=[2, 2], res_depth=1, fft_sizes=[16])
    torch.manual_seed(0)
    model = LQVAE(LQVAEConfig(**{**options, **overrides}))
    model.quantizer.ema_update(model.encode(torch.randn(4, 64)).transpose(1, 2).reshape(-1, 4).detach())
    return model


def test_straight_through_gradients_reach_the_encoder():
    model = tiny_lqvae(lin_weight=0.0)
    x = torch.randn(4, 64)
    terms = model.losses(x, torch.tensor([1, 2, 3, 0]))
    terms["mse"].backward()  # the reconstruction alone: no commit term to carry a gradient to E
    gradients = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in gradients)
    assert sum(g.abs().sum() for g in gradients) > 0


class IdentityQuantizer(nn.Module):
    def forward(self, h, update=False):
        return h, torch.zeros(h.shape[0], h.shape[2], dtype=torch.long), h.new_zeros(())


@pytest.mark.parametrize("mixing", ["mean", "sum"])
def test_linearisation_loss_is_zero_for_a_linear_encoder_with_an_identity_quantiser(mixing):
    model = tiny_lqvae(lin_mixing=mixing)
    model.quantizer = IdentityQuantizer()
    linear = nn.Conv1d(1, 4, 4, stride=4, bias=False)
    model.encoder = linear
    x, partner = torch.randn(6, 64), torch.tensor([1, 2, 3, 4, 5, 0])
    ql, lq, _, _ = model.linearisation(x, partner)
    assert (lq - ql).pow(2).mean() < 1e-12
    # A nonlinear encoder breaks it: the loss measures something.
    model.encoder = nn.Sequential(linear, nn.Tanh())
    ql, lq, _, _ = model.linearisation(3 * x, partner)
    assert (lq - ql).pow(2).mean() > 1e-3


def test_linearisation_uses_the_experiments_mixing_weights():
    model = tiny_lqvae(lin_mixing="sum")
    model.quantizer = IdentityQuantizer()
    captured = []
    model.encoder = nn.Identity()
    model.encode = lambda x: captured.append(x) or x.unsqueeze(1)
    x, partner = torch.randn(2, 64), torch.tensor([1, 0])
    model.linearisation(x, partner)
    assert torch.allclose(captured[-1], x + x[partner])  # sum mixing: x1 + x2, not their mean


def test_bad_lqvae_options_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="strides must be even"):
        LQVAEConfig(strides=[3])
    with pytest.raises(ValueError, match="lin_mixing"):
        LQVAEConfig(lin_mixing="product")
    with pytest.raises(ValueError, match="multiple of its hop"):
        tiny_lqvae().encode(torch.randn(1, 63))
