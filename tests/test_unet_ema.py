"""The U-Net denoiser (model.net=unet), the EMA of the weights (model.ema_decay) and the denoiser-quality report."""
import json

import pytest
import torch

from callbacks.weight_ema import ema_update
from experiments.config import load_config, to_dict
from experiments.run_layout import load_prior, prior_dir
from experiments.train import train_noiseless
from lightning_modules.metrics.denoiser_quality import denoiser_quality
from lightning_modules.nn.unet_denoiser import UNetDenoiser
from lightning_modules.prior_registry import build_prior, resolve_model_config
from tests.conftest import TINY_SCORE

TINY_UNET = [o for o in TINY_SCORE if not o.startswith("model.")] + [
    "model.name=score", "model.net=unet", "model.unet_widths=[8,16,16]", "model.unet_factors=[4,2]",
    "model.squeeze=4", "model.embed_dim=16", "model.unet_blocks=1", "trainer.max_steps=12",
    "trainer.val_check_interval=6", "trainer.checkpoint_every_n_steps=6"]


@pytest.mark.parametrize("preset, crop", [("default", 2048), ("default", 4096), ("paper", 262144)])
def test_unet_shapes_for_the_presets(preset, crop):
    model = resolve_model_config(to_dict(load_config("toy_score", preset, ["model.net=unet"]).model))
    options = dict(widths=model["unet_widths"], factors=model["unet_factors"], patch=model["squeeze"],
                   blocks=model["unet_blocks"], attention_levels=model["unet_attention_levels"],
                   embed_dim=model["embed_dim"])
    with torch.device("meta"):  # the paper's U-Net (hundreds of millions of weights) without the memory
        net = UNetDenoiser(4, **options)
        out = net(torch.empty(2, 4, crop), torch.empty(2, 4))
    assert out.shape == (2, 4, crop) and crop % net.length_multiple == 0


def test_sigma_conditioning_changes_the_output_and_priors_stay_independent():
    torch.manual_seed(0)
    net = UNetDenoiser(2, widths=(8, 16, 16), factors=(4, 2), patch=4, blocks=1, embed_dim=16)
    with torch.no_grad():
        for parameter in net.parameters():  # away from the zero-initialised outputs
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(1, 2, 256)
    low, high = net(x, torch.full((1, 2), -2.0)), net(x, torch.full((1, 2), 0.5))
    assert (low - high).abs().mean() > 1e-3
    changed = x.clone()
    changed[:, 1] = torch.randn(256)
    again = net(changed, torch.full((1, 2), -2.0))
    assert torch.equal(again[:, 0], low[:, 0]) and not torch.equal(again[:, 1], low[:, 1])


def test_ema_update_is_its_formula_and_copies_flags():
    averaged, current = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    assert torch.allclose(ema_update(averaged, current, 5, decay=0.9), torch.tensor([1.2, 1.8]))
    assert torch.equal(ema_update(torch.tensor(False), torch.tensor(True), 5, decay=0.9), torch.tensor(True))


def test_the_checkpoint_serves_the_ema_of_the_trained_weights(tmp_path, monkeypatch):
    """The EMA recomputed from the raw weights after every step equals what load_prior serves; the raw weights
    are kept beside it, and the denoiser-quality report is written and logged."""
    import pytorch_lightning as pl

    raw = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            raw.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    import experiments.fitting as fitting

    original = fitting.build_trainer
    monkeypatch.setattr(fitting, "build_trainer", lambda config, run_dir, job, callbacks, *a: original(
        config, run_dir, job, [Recorder(), *callbacks], *a))
    config = load_config("toy_score", "default", TINY_UNET + ["model.ema_decay=0.8", f"output_root={tmp_path}"])
    train_noiseless(config)
    expected = dict(raw[0])
    for state in raw[1:]:
        # Written out here, not through ema_update: EMA_t = 0.8 EMA_{t-1} + 0.2 w_t; flags are copied.
        expected = {k: 0.8 * expected[k] + 0.2 * v if v.is_floating_point() else v for k, v in state.items()}
    served = load_prior(prior_dir(config, 0.0)).state_dict()
    for key, value in served.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(served["prior.net.start.conv.weight"], raw[-1]["prior.net.start.conv.weight"])
    report = json.loads((prior_dir(config, 0.0) / "denoiser_quality.json").read_text())
    assert report["sigmas"] == [0.01, 0.03, 0.1, 0.3, 1.0] and len(report["noise_left"][0]) == 4
    assert all(0 < v < 2 for row in report["noise_left"] for v in row)
    assert "denoise/sine/noise_left_0.1" in (prior_dir(config, 0.0) / "logs" / "metrics.csv").read_text()


def test_denoiser_quality_of_a_perfect_and_of_the_identity_denoiser():
    x = torch.sin(torch.linspace(0, 60, 512)).view(1, 1, -1).repeat(2, 2, 1)

    class Oracle:
        def denoise(self, noisy, sigma):
            return x

    class Identity:
        def denoise(self, noisy, sigma):
            return noisy

    assert max(max(row) for row in denoiser_quality(Oracle(), x)["noise_left"]) == 0
    identity = denoiser_quality(Identity(), x)["noise_left"]
    assert all(abs(v - 1) < 0.1 for row in identity for v in row)
    prior = build_prior(to_dict(load_config("toy_score", "default", TINY_UNET).model), 2)
    report = denoiser_quality(prior, x)  # untrained: D = c_skip x, a linear shrinkage
    assert all(a >= b - 0.05 for r1, r2 in zip(report["noise_left"], report["linear_noise_left"]) for a, b in zip(r1, r2))
