"""The N priors of one module train exactly as they would alone: per-prior clipping, per-prior skips
of non-finite steps (also under DDP), per-rank and per-step noise, and per-prior early stopping."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from callbacks.per_prior_early_stopping import PerPriorEarlyStopping
from lightning_modules.prior_module import PriorModule, per_prior

REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "flowavenet", "n_blocks": 1, "n_flows": 1, "n_layers": 2, "width": 4}


class SGDPrior(PriorModule):
    """Plain SGD, so a step is lr x the (clipped) gradient: Adam would hide a rescaled gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def alone(family, k):
    """A one-prior module holding prior k of ``family``'s weights."""
    single = type(family)(MODEL, [family.sources[k]], lr=family.hparams.lr)
    n, params, buffers = len(family.sources), dict(family.named_parameters()), family.state_dict()
    single.load_state_dict({
        name: per_prior(params[name].detach(), n)[k].view(value.shape) if name in params else buffers[name]
        for name, value in single.state_dict().items()
    })
    return single


def one_step(module, x, clip):
    """One real Lightning optimisation step on batch x [B, N, T]."""
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip)
    trainer.fit(module, train_dataloaders=DataLoader([{"sources": x}], batch_size=None))
    return module


def initialised_pair(cls=PriorModule):
    torch.manual_seed(0)
    family = cls(MODEL, ["sine", "saw"], lr=1e-2)
    family.prior.train()
    family.log_prob(torch.randn(4, 2, 64))  # ActNorm's data-dependent init, then make couplings non-trivial
    with torch.no_grad():
        for p in family.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return family


@pytest.mark.parametrize("case", ["clipping", "nan"])
def test_one_prior_trains_as_it_would_alone(case):
    family = initialised_pair(SGDPrior if case == "clipping" else PriorModule)
    x = torch.randn(4, 2, 64)
    if case == "clipping":
        x[:, 1] *= 50.0  # prior 1's huge gradient must not shrink prior 0's step
        clip = 1.0
    else:
        x[0, 1, 5] = float("nan")  # prior 1's loss is non-finite: only prior 1 skips
        clip = 0.0
    single = alone(family, 0)
    before_1 = [per_prior(p.detach(), 2)[1].clone() for p in family.parameters()]
    torch.testing.assert_close(single.log_prob(x[:, :1]), family.log_prob(x)[:, :1])
    one_step(family, x, clip)
    one_step(single, x[:, :1], clip)
    for p_family, p_single in zip(family.parameters(), single.parameters()):
        torch.testing.assert_close(per_prior(p_family.detach(), 2)[0], p_single.detach().flatten(), atol=1e-6, rtol=1e-5)
    moved_1 = any(not torch.equal(per_prior(p.detach(), 2)[1], b) for p, b in zip(family.parameters(), before_1))
    if case == "nan":
        assert not moved_1 and family.skipped_per_prior == [0, 1]
    else:
        assert moved_1 and family.skipped_per_prior == [0, 0]


def test_non_finite_gradient_skips_only_that_prior():
    module = initialised_pair()
    optimizer = torch.optim.Adam(module.parameters(), lr=1.0)
    module.log_prob(torch.randn(2, 2, 64)).sum().backward()
    first = next(module.parameters())
    per_prior(first.grad, 2)[0, 0] = float("inf")
    before = [per_prior(p.detach(), 2).clone() for p in module.parameters()]
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert module.skipped_per_prior == [1, 0]
    after = [per_prior(p.detach(), 2) for p in module.parameters()]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(after, before))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(after, before))


def test_training_noise_is_fresh_every_step():
    seen = []

    class Recording(PriorModule):
        def log_prob(self, x, **kwargs):
            seen.append(x.detach().clone())
            return super().log_prob(x, **kwargs)

    module = Recording(MODEL, ["sine", "saw"], noise_sigma=0.5, lr=1e-3)
    clean = torch.zeros(2, 2, 4096)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([{"sources": clean}] * 3, batch_size=None))
    noises = [x - clean for x in seen]
    assert len(noises) == 3
    for noise in noises:
        assert abs(noise.std().item() - 0.5) < 0.02 and abs(noise.mean().item()) < 0.02
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[1], noises[2])
    assert abs(torch.corrcoef(torch.stack([noises[0].flatten(), noises[1].flatten()]))[0, 1]) < 0.05


DDP_SCRIPT = '''
import json, sys, torch, pytorch_lightning as pl
from torch.utils.data import DataLoader
from lightning_modules.prior_module import PriorModule

out = sys.argv[1]
MODEL = {"name": "flowavenet", "n_blocks": 1, "n_flows": 1, "n_layers": 2, "width": 4}

class Poisoned(PriorModule):
    noise_at_step_0 = None

    def add_noise(self, x, generator=None):
        noisy = super().add_noise(x, generator)
        if self.global_step == 0:
            self.noise_at_step_0 = (noisy - x).detach().flatten()[:64].tolist()
        return noisy

    def log_prob(self, x, **kwargs):
        log_prob = super().log_prob(x, **kwargs)
        if self.training and self.global_rank == 1 and self.global_step == 1:
            log_prob = log_prob.clone()
            log_prob[:, 1] = float("nan")  # prior 1 diverges on rank 1 only
        return log_prob

pl.seed_everything(0)
module = Poisoned(MODEL, ["sine", "saw"], noise_sigma=0.1, lr=1e-2, seed=3)
batches = [{"sources": torch.zeros(2, 2, 64)} for _ in range(8)]
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
weights = torch.cat([p.detach().flatten() for p in module.parameters()])
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"skipped": module.skipped_per_prior, "step": trainer.global_step, "noise": module.noise_at_step_0,
               "weights": weights.tolist()}, f)
'''


def test_ddp_non_finite_loss_skips_on_every_rank_with_per_rank_noise(tmp_path):
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_SCRIPT)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["step"] == 3
        assert rank["skipped"] == [0, 1]  # the step of prior 1 is skipped on both ranks
        assert all(math.isfinite(w) for w in rank["weights"])
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-6)  # replicas stay equal
    assert ranks[0]["noise"] != pytest.approx(ranks[1]["noise"], abs=1e-3)  # each rank draws its own noise


def test_early_stopping_keeps_each_priors_best_and_waits_for_all():
    module = PriorModule(MODEL, ["sine", "saw"])
    stopper = PerPriorEarlyStopping(["sine", "saw"], patience=2)
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=0, callback_metrics={},
                          strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=False: decision))
    # Prior "sine" peaks at check 1, prior "saw" at check 3; weights differ at every check.
    values = [(0.0, 0.0), (1.0, 0.1), (0.5, 0.2), (0.4, 0.3), (0.3, 0.25), (0.2, 0.2)]
    snapshots = []
    for check, (sine, saw) in enumerate(values):
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float(check))
        snapshots.append([p.detach().clone() for p in module.parameters()])
        trainer.global_step = 10 * check
        trainer.callback_metrics = {"val/loglik_sine": torch.tensor(sine), "val/loglik_saw": torch.tensor(saw),
                                    "val/loglik": torch.tensor((sine + saw) / 2)}
        stopper.on_validation_end(trainer, module)
        if check < 5:
            assert not trainer.should_stop, check  # "saw" is still improving or within patience
    assert trainer.should_stop
    stopper.restore_best(module)
    for p, at_1, at_3 in zip(module.parameters(), snapshots[1], snapshots[3]):
        assert torch.equal(per_prior(p.detach(), 2)[0], per_prior(at_1, 2)[0])
        assert torch.equal(per_prior(p.detach(), 2)[1], per_prior(at_3, 2)[1])
    assert stopper.summary()["sine"]["best_step"] == 10 and stopper.summary()["saw"]["best_step"] == 30
    # Resumable: the state survives a round trip.
    copy = PerPriorEarlyStopping(["sine", "saw"], patience=2)
    copy.load_state_dict(stopper.state_dict())
    assert copy.summary() == stopper.summary()


def test_fp16_is_refused_for_grouped_priors_and_bf16_is_not():
    """fp16's one loss scaler skips the whole family's step when one prior overflows: the priors would be coupled."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from datamodules.toy import ToyDataModule

    family = PriorModule(MODEL, ["sine", "square"])
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))  # Lightning's CPU default is bf16
    trainer = pl.Trainer(accelerator="cpu", plugins=[fp16], max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    data = ToyDataModule(sources=["sine", "square"], crop_length=64, batch_size=2, n_train=4, n_val=2)
    with pytest.raises(ValueError, match="bf16"):
        trainer.fit(family, datamodule=data)
    for precision in ("bf16-mixed", "32-true"):
        family.trainer = SimpleNamespace(precision=precision)
        family.setup("fit")
    single = PriorModule(MODEL, ["pooled"])  # one prior: nothing to couple
    single.trainer = SimpleNamespace(precision="16-mixed")
    single.setup("fit")
