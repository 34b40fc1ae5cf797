import pytest
import torch

from lightning_modules.nn.actnorm import ActNorm
from lightning_modules.nn.flowavenet import FloWaveNet, FlowConfig, squeeze, unsqueeze


def tiny_flow(n_priors=2, seed=0):
    torch.manual_seed(seed)
    flow = FloWaveNet(n_priors, FlowConfig(n_blocks=2, n_flows=2, n_layers=2, width=8)).double()
    flow(torch.randn(4, n_priors, 32, dtype=torch.float64))  # data-dependent ActNorm init
    with torch.no_grad():  # move away from the identity initialisation so the test means something
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


def test_squeeze_round_trip_and_order():
    x = torch.arange(8.0).view(1, 1, 1, 8)
    y = squeeze(x)
    assert y.shape == (1, 1, 2, 4)
    assert y[0, 0, 0].tolist() == [0, 2, 4, 6]  # even samples first
    assert torch.equal(unsqueeze(y), x)


def test_flow_is_invertible():
    flow = tiny_flow()
    x = torch.randn(3, 2, 64, dtype=torch.float64)
    z, _ = flow(x)
    assert z.shape == (3, 2, 4, 16)
    assert torch.allclose(flow.reverse(z), x, atol=1e-10)


def test_logdet_matches_brute_force_jacobian():
    flow = tiny_flow()
    x = torch.randn(1, 2, 16, dtype=torch.float64)
    _, logdet = flow(x)
    for prior in range(2):
        def latent_of(channel):
            full = x.clone()
            full[0, prior] = channel
            return flow(full)[0][0, prior].reshape(-1)

        jacobian = torch.autograd.functional.jacobian(latent_of, x[0, prior])
        assert jacobian.shape == (16, 16)
        assert torch.allclose(torch.slogdet(jacobian).logabsdet, logdet[0, prior], atol=1e-8)


def test_log_prob_is_the_full_change_of_variables_density():
    flow = tiny_flow()
    x = torch.randn(2, 2, 16, dtype=torch.float64)
    z, logdet = flow(x)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(2, 3)) + logdet
    assert torch.allclose(flow.log_prob(x) * 16, expected)
    assert torch.allclose(flow.log_prob(x, latent_only=True) * 16, expected - logdet)


def test_priors_are_independent_and_log_prob_differentiable():
    flow = tiny_flow()
    x = torch.randn(2, 2, 32, dtype=torch.float64, requires_grad=True)
    log_prob = flow.log_prob(x)
    assert log_prob.shape == (2, 2)
    (grad,) = torch.autograd.grad(log_prob[:, 0].sum(), x)
    assert torch.isfinite(grad).all() and grad[:, 0].abs().sum() > 0
    assert grad[:, 1].abs().max() == 0  # prior 0 never sees source 1


def test_zero_initialised_couplings_start_as_identity():
    flow = FloWaveNet(1, FlowConfig(n_blocks=1, n_flows=2, n_layers=2, width=8)).eval()
    x = torch.randn(2, 1, 16)
    z, logdet = flow(x)
    assert torch.allclose(logdet, torch.zeros_like(logdet))
    assert torch.allclose(flow.reverse(z), x, atol=1e-6)


def test_sampling_and_length_errors():
    flow = tiny_flow()
    samples = flow.sample(3, 64)
    assert samples.shape == (3, 2, 64) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="multiple of"):
        flow(torch.randn(1, 2, 30, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        flow(torch.randn(1, 3, 32, dtype=torch.float64))


def test_actnorm_data_dependent_init():
    norm = ActNorm(2, 3).train()
    x = 5 + 3 * torch.randn(16, 2, 3, 100)
    y, logdet = norm(x)
    assert torch.allclose(y.mean(dim=(0, 3)), torch.zeros(2, 3), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)
    assert torch.allclose(logdet[0], 100 * norm.log_scale.sum(dim=(1, 2)))
    # Initialised once: a second batch with other statistics is not re-normalised.
    loc = norm.loc.clone()
    norm(torch.randn(4, 2, 3, 100))
    assert torch.equal(norm.loc, loc) and bool(norm.initialized)
    assert torch.allclose(norm.reverse(y), x, atol=1e-4)


def test_bf16_log_prob_accumulates_log_dets_in_float32():
    """Under bf16 autocast only the coupling WaveNets run in bf16; the log-dets and the per-sample
    log-likelihood accumulate in float32 (summed in bf16 they drift by ~3e-3 nats/sample here)."""
    torch.manual_seed(0)
    flow = FloWaveNet(2, FlowConfig(n_blocks=2, n_flows=2, n_layers=2, width=8))
    flow.train()
    flow(torch.randn(2, 2, 512) * 0.5)  # ActNorm's data-dependent init
    flow.eval()
    for module in flow.modules():
        if hasattr(module, "end_out"):  # non-trivial couplings with a positive log-scale on average
            torch.nn.init.normal_(module.end_out.conv.weight, std=0.02)
            torch.nn.init.uniform_(module.end_out.conv.bias, 0.05, 0.1)
    x = torch.randn(2, 2, 32768) * 0.5
    with torch.no_grad():
        reference = flow.log_prob(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = flow.log_prob(x)
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 1e-3


@pytest.mark.parametrize("family", ["flowavenet", "wavenet"])
def test_every_parameter_reaches_the_loss(family):
    """DDP refuses to train a module with parameters outside the loss's graph."""
    from lightning_modules.prior_registry import build_prior

    options = {"name": family, "n_blocks": 2, "n_layers": 3, "width": 4}
    options.update({"n_flows": 2} if family == "flowavenet" else {"n_classes": 16, "likelihood": "smoothed"})
    prior = build_prior(options, 2).train()
    prior.log_prob(torch.randn(2, 2, 64)).sum().backward()
    unused = [name for name, p in prior.named_parameters() if p.grad is None]
    assert not unused


def test_checkpoints_with_the_old_last_residual_conv_still_load():
    flow = FloWaveNet(2, FlowConfig(n_blocks=1, n_flows=1, n_layers=2, width=4))
    state = flow.state_dict()
    last = "blocks.0.steps.0.coupling.net.layers.1"
    state[f"{last}.residual.conv.weight"] = torch.zeros(8, 4, 1)
    state[f"{last}.residual.conv.bias"] = torch.zeros(8)
    flow.load_state_dict(state)  # strict: the stale keys are dropped, nothing else is missing
