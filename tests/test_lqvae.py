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


# Linearisation on N-source groups (model.lin_sources): the pair path unchanged, N-tuples by hand.
def old_pair_losses(model, x, partner):
    """Paper 002's pair loss as the code had it before N-source groups, for the bit-identity check."""
    quantised, _, _ = model.quantizer(model.encode(x))
    ql, _, _ = model.quantizer(0.5 * quantised + 0.5 * quantised[partner])
    lq, _, _ = model.quantizer(model.encode(0.5 * x + 0.5 * x[partner]))
    reconstruction = model.decode(quantised)
    return (lq - ql).pow(2).mean(), (reconstruction - x).pow(2).mean()


def test_the_pair_path_is_bit_identical_to_the_old_formula():
    from lightning_modules.lqvae_module import lin_groups, pairs

    model = tiny_lqvae()
    torch.manual_seed(1)
    batch = torch.randn(2, 4, 64)
    x, partner = lin_groups(batch, 2)
    old_x, old_partner = pairs(batch)
    assert torch.equal(x, old_x) and torch.equal(partner, old_partner)
    terms = model.losses(x, partner)
    old_lin, old_mse = old_pair_losses(model, x, partner)
    assert torch.equal(terms["lin"], old_lin) and torch.equal(terms["mse"], old_mse)
    # The same graph too: equal gradients of the linearisation term.
    new_grads = torch.autograd.grad(terms["lin"], list(model.encoder.parameters()))
    old_grads = torch.autograd.grad(old_pair_losses(model, x, partner)[0], list(model.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


def nearest_by_hand(vectors, codebook):
    """[B, D, S] -> the nearest code of every column, by an explicit argmin over the codebook."""
    columns = vectors.transpose(1, 2)  # [B, S, D]
    distances = ((columns[..., None, :] - codebook) ** 2).sum(-1)  # [B, S, K]
    return codebook[distances.argmin(-1)].transpose(1, 2)


@pytest.mark.parametrize("mixing, weight", [("mean", 1 / 3), ("sum", 1.0)])
def test_the_n_source_linearisation_loss_equals_a_hand_computation(mixing, weight):
    model = tiny_lqvae(lin_mixing=mixing)
    torch.manual_seed(2)
    x = torch.randn(6, 64)  # two examples of three sources
    groups = torch.tensor([[0, 1, 2], [3, 4, 5]])
    codebook = model.quantizer.codebook
    with torch.no_grad():
        codes = nearest_by_hand(model.encode(x), codebook)
        ql = nearest_by_hand(weight * (codes[0::3] + codes[1::3] + codes[2::3]), codebook)
        lq = nearest_by_hand(model.encode(weight * (x[0::3] + x[1::3] + x[2::3])), codebook)
        expected = (lq - ql).pow(2).mean()
        terms = model.losses(x, groups)
    assert expected > 0
    assert torch.allclose(terms["lin"], expected, rtol=1e-5, atol=1e-7)


def test_linearisation_groups_mix_distinct_sources_of_one_example():
    from lightning_modules.lqvae_module import lin_groups, lin_labels

    batch = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    x, groups = lin_groups(batch, 4)
    assert torch.equal(x, batch.reshape(8, 3)) and groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    _, rotations = lin_groups(batch, 4, distinct=False)  # the report: one group starting at each source
    assert rotations.shape == (8, 4) and rotations[1].tolist() == [1, 2, 3, 0]
    _, triples = lin_groups(batch, 3)
    assert triples.shape == (8, 3) and triples[3].tolist() == [3, 0, 1] and triples[4].tolist() == [4, 5, 6]
    assert all(len(set(g.tolist())) == 3 and len({int(i) // 4 for i in g}) == 1 for g in triples)
    sources = ["sine", "square", "saw", "triangle"]
    assert lin_labels(sources, 2) == ["sine+square", "square+saw", "saw+triangle", "triangle+sine"]
    assert lin_labels(sources, 4)[0] == "sine+square+saw+triangle"


def test_bad_lin_sources_are_refused_with_a_clear_message():
    from lightning_modules.lqvae_module import LQVAEModule, resolve_lin_sources

    assert resolve_lin_sources(None, 4) == 4 and resolve_lin_sources(2, 4) == 2
    with pytest.raises(ValueError, match="lin_sources must be >= 2"):
        LQVAEConfig(lin_sources=1)
    with pytest.raises(ValueError, match="between 2 and the number of sources"):
        resolve_lin_sources(5, 4)
    model = {"name": "lqvae", "codebook_size": 8, "code_dim": 4, "vq_width": 8, "strides": [2, 2], "res_depth": 1,
             "width": 16, "n_layers": 1, "n_heads": 2, "context": 8}
    with pytest.raises(ValueError, match="between 2 and the number of sources"):
        LQVAEModule({**model, "lin_sources": 3}, sources=["sine", "square"])
    assert LQVAEModule(model, sources=["sine", "square", "saw"]).lin_sources == 3
