"""The fast paths compute what the plain ones do: batched-matmul 1x1 convs, padding inside the conv,
the fused gate, flow halves without concatenation, WaveNet log-lik without log-softmax, in-place sums."""
import math

import pytest
import torch
from torch import nn

from lightning_modules.nn import grouped
from lightning_modules.nn.flowavenet import FloWaveNet, FlowConfig, flip, squeeze
from lightning_modules.nn.gated_activation import gated_tanh_sigmoid
from lightning_modules.nn.gated_wavenet import GatedWaveNet
from lightning_modules.nn.grouped import GroupedConv1d
from lightning_modules.nn.mu_law import mu_law_encode
from lightning_modules.nn.wavenet import WaveNet, WaveNetConfig


def perturb(module, seed=0, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(module.named_parameters()):
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def reference_conv(conv, x, past=None):
    """The grouped conv written out per group with an explicit padded copy (the definition)."""
    batch, groups, channels, time = x.shape
    h = nn.functional.pad(x, conv.pad) if past is None else torch.cat([past, x], dim=3)
    weights = conv.conv.weight.chunk(groups, dim=0)
    biases = conv.conv.bias.chunk(groups, dim=0)
    return torch.stack([nn.functional.conv1d(h[:, g], weights[g], biases[g], dilation=conv.conv.dilation)
                        for g in range(groups)], dim=1)


@pytest.mark.parametrize("kernel_size,dilation,causal", [(1, 1, False), (3, 1, False), (3, 4, False), (3, 2, True), (2, 3, False)])
def test_grouped_conv_paths_equal_the_per_group_definition(kernel_size, dilation, causal):
    torch.manual_seed(0)
    conv = GroupedConv1d(3, 4, 5, kernel_size, dilation, causal).double()
    x = torch.randn(2, 3, 4, 37, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    expected = reference_conv(conv, x)
    assert torch.allclose(out, expected, atol=1e-12)
    weight_grad, input_grad = torch.autograd.grad(out.sin().sum(), [conv.conv.weight, x])
    expected_weight_grad, expected_input_grad = torch.autograd.grad(expected.sin().sum(), [conv.conv.weight, x])
    assert torch.allclose(weight_grad, expected_weight_grad, atol=1e-10)
    assert torch.allclose(input_grad, expected_input_grad, atol=1e-10)


def test_grouped_conv_with_cached_past_equals_the_definition():
    torch.manual_seed(0)
    conv = GroupedConv1d(2, 3, 4, 3, 2, causal=True).double()
    x, past = torch.randn(1, 2, 3, 5, dtype=torch.float64), torch.randn(1, 2, 3, 4, dtype=torch.float64)
    assert torch.allclose(conv(x, past), reference_conv(conv, x, past), atol=1e-12)


def test_matmul_and_convolution_paths_agree_on_a_whole_flow(monkeypatch):
    torch.manual_seed(0)
    flow = perturb(FloWaveNet(2, FlowConfig(n_blocks=2, n_flows=2, n_layers=3, width=8)).double(), scale=0.05)
    x = (torch.rand(3, 2, 64, dtype=torch.float64) - 0.5).requires_grad_(True)
    fast = flow.log_prob(x)
    (fast_grad,) = torch.autograd.grad(fast.sum(), x)
    monkeypatch.setattr(grouped, "FORCED_PATH", "conv")
    slow = flow.log_prob(x)
    (slow_grad,) = torch.autograd.grad(slow.sum(), x)
    assert torch.allclose(fast, slow, atol=1e-12)
    assert torch.allclose(fast_grad, slow_grad, atol=1e-10)


def test_fused_gate_equals_tanh_times_sigmoid_with_exact_gradients():
    y = torch.randn(2, 3, 8, 5, dtype=torch.float64, requires_grad=True)
    a, b = y.chunk(2, dim=2)
    assert torch.equal(gated_tanh_sigmoid(y), torch.tanh(a) * torch.sigmoid(b))
    assert torch.autograd.gradcheck(gated_tanh_sigmoid, (y,))


def test_fused_gate_under_bf16_autocast_keeps_the_input_dtype():
    y = torch.randn(2, 2, 6, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_tanh_sigmoid(y.to(torch.bfloat16))
    (grad,) = torch.autograd.grad(out.float().sum(), y)
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_flow_halves_equal_the_full_tensor_steps():
    """FlowBlock carries the channel halves apart; the definition on whole tensors (ActNorm, coupling,
    flip per step, with their concatenations) gives the same latents and log-dets."""
    torch.manual_seed(0)
    flow = perturb(FloWaveNet(2, FlowConfig(n_blocks=2, n_flows=3, n_layers=2, width=8)).double(), scale=0.05)
    x = torch.rand(2, 2, 32, dtype=torch.float64) - 0.5
    z, logdet = flow(x)
    h, expected_logdet = x.unsqueeze(2), torch.zeros(2, 2, dtype=torch.float64)
    for block in flow.blocks:
        h = squeeze(h)
        for step in block.steps:
            h, actnorm_logdet = step.actnorm(h)
            h, coupling_logdet = step.coupling(h)
            h = flip(h)
            expected_logdet = expected_logdet + actnorm_logdet + coupling_logdet
    assert torch.allclose(z, h, atol=1e-12)
    assert torch.allclose(logdet, expected_logdet, atol=1e-10)
    assert torch.allclose(flow.reverse(z), x, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["mulaw", "smoothed"])
def test_wavenet_log_prob_equals_the_log_softmax_definition(likelihood):
    torch.manual_seed(0)
    wavenet = perturb(WaveNet(2, WaveNetConfig(n_blocks=1, n_layers=3, width=8, n_classes=16, likelihood=likelihood)).double(),
                      scale=0.1)
    x = torch.rand(3, 2, 40, dtype=torch.float64) * 1.8 - 0.9
    log_probs = torch.log_softmax(wavenet.logits(x), dim=2)
    if likelihood == "mulaw":
        expected = log_probs.gather(2, mu_law_encode(x, 15).unsqueeze(2)).squeeze(2).mean(dim=2)
    else:
        sigma = wavenet.component_sigma
        log_normal = (-0.5 * ((x.unsqueeze(2) - wavenet.centres.view(1, 1, -1, 1).double()) / sigma) ** 2
                      - math.log(sigma * math.sqrt(2 * math.pi)))
        expected = torch.logsumexp(log_probs + log_normal, dim=2).mean(dim=2)
    assert torch.allclose(wavenet.log_prob(x).double(), expected, atol=1e-5)  # (log_prob scores in float32)


def test_in_place_sums_keep_gradients_exact():
    """The in-place residual scaling and skip sum must not corrupt anything autograd saved."""
    torch.manual_seed(0)
    net = perturb(GatedWaveNet(2, 3, 4, 6, 4).double(), scale=0.2)
    x = torch.randn(2, 2, 3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: net(v), (x,))


def test_samplers_run_in_bf16_with_float32_chains():
    """bf16 inference for the samplers (PRESET=bf16 on a GPU; CPU autocast here takes the same path):
    the priors' networks run in bf16, the chains, the mixture term and the noise stay float32, and the
    estimates stay close to the float32 run with the same seeds."""
    from lightning_modules.samplers.diffusion import DiffusionSeparator
    from lightning_modules.samplers.langevin import LangevinSeparator, sgld_levels
    from lightning_modules.samplers.mixing import mixing_weights
    from lightning_modules.samplers.level_score import LevelScore
    from lightning_modules.nn.score_prior import ScoreConfig, ScorePrior

    torch.manual_seed(0)
    flow = perturb(FloWaveNet(2, FlowConfig(n_blocks=2, n_flows=2, n_layers=2, width=8)), scale=0.02).eval()
    score = perturb(ScorePrior(2, ScoreConfig(width=8, n_layers=2, squeeze=4)), scale=0.02).eval()
    mix = torch.rand(2, 64) - 0.5
    alpha = mixing_weights("mean", 2)
    samplers = {
        "langevin": LangevinSeparator(LevelScore([(0.0, flow.requires_grad_(False))]), sgld_levels(1e-4, 0.1, 3), alpha),
        "diffusion": DiffusionSeparator(score.requires_grad_(False), alpha, sigma_max=1.0, sigma_min=0.01, steps=4),
    }
    for name, sampler in samplers.items():
        reference, _ = sampler(mix, 2, [0, 1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            estimates, trace = sampler(mix, 2, [0, 1])
        assert estimates.dtype == torch.float32 and torch.isfinite(estimates).all(), name
        assert (estimates - reference).abs().max() < 0.05 * reference.abs().max(), name
        assert sampler.nonfinite_steps == 0, name


def test_fused_gate_has_the_second_derivatives_of_the_plain_formula():
    torch.manual_seed(0)
    y = torch.randn(2, 3, 8, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 4, 5, dtype=torch.float64)

    def plain(y):
        a, b = y.chunk(2, dim=2)
        return torch.tanh(a) * torch.sigmoid(b)

    def gradient_penalty_grad(gate):
        (grad,) = torch.autograd.grad((gate(y) * weight).sum(), y, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), y)[0]

    assert torch.allclose(gradient_penalty_grad(gated_tanh_sigmoid), gradient_penalty_grad(plain), atol=1e-12)
    assert torch.autograd.gradgradcheck(gated_tanh_sigmoid, (y,))
