"""Thin Lightning wrapper that trains the amortised posterior q(s | m) on the ELBO (lightning_modules/nn/elbo.py)
against frozen priors, from mixtures only: a training batch is ``{"mix", "index"}`` and one that carries
``sources`` is refused, so no reference can enter the loss.

    loss = -mean_b [ w (sum_k E_q log p_k(s_k) + sum_k H[q_k]) + E_q log N(m; g(s), gamma^2 I) ]

With ``derived`` (a source name) the likelihood is the Dirac delta(m - g(s)) instead: that source is derived
from the others (lightning_modules/nn/dirac_posterior.py), the mixture term is 0 and gamma unused.

``w`` (the KL warm-up) rises linearly from 0 to 1 over ``warmup_steps``. A step whose loss or gradient is not
finite on any rank is skipped on every rank. Validation logs the ELBO at fixed noise and, as a monitor
only (nothing is selected or stopped on it), the SI-SDRi of the posterior mean against the references.

The frozen prior is not saved in the checkpoint: ``posterior_source.json`` beside it names the prior's
checkpoint and its sha256, and loading refuses a changed prior.

``schedule`` (a ``PriorSchedule``, ``posterior.prior_sigmas``): training steps go through the prior levels
coarse to fine, the stage a function of the global step; ``prior`` (with ``score_sigma``) is then the last,
finest level, which validation and separation use. No level is saved in the checkpoint either.

``sleep_steps`` (wake-sleep): the first steps are the sleep phase instead, the forward KL of the model's own
joint: q maximises log q(s | m) on sources ``s`` drawn from the priors and their mixture ``m`` (a ``SleepBank``,
lightning_modules/nn/sleep_bank.py; the batch's mixtures are unused); the ELBO steps (the wake phase) follow.
The sleep phase needs neither references nor the prior's log-density, only its samples.
"""
import math

import pytorch_lightning as pl
import torch

from lightning_modules.nn.dirac_posterior import DiracPosterior
from lightning_modules.nn.elbo import elbo_terms, elbo_value
from lightning_modules.nn.posterior_net import PosteriorNet, PosteriorNetConfig
from lightning_modules.nn.sleep_bank import SleepBank
from lightning_modules.prior_module import any_rank, mix_seed, restore_rng_states, save_rng_states
from lightning_modules.metrics.separation_metrics import si_sdr, si_sdr_of_mix

# The frozen priors' state_dict keys (the finest level, the schedule's levels): never saved in a checkpoint.
FROZEN_PREFIXES = ("prior.", "prior_schedule.")


class PosteriorModule(pl.LightningModule):
    def __init__(self, net: dict, sources: list, alpha: list, gamma: float = 0.05, derived=None, warmup_steps: int = 0,
                 lr: float = 1e-3, lr_decay_times: int = 0, schedule_steps: int = 1000, score_sigma=None,
                 seed: int = 0, prior_sigma=None, sleep_steps: int = 0, prior=None, schedule=None, bank=None):
        super().__init__()
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"posterior.gamma must be a positive number, got {gamma!r}")
        if warmup_steps < 0:
            raise ValueError(f"posterior.warmup_steps must be >= 0, got {warmup_steps}")
        if len(alpha) != len(sources):
            raise ValueError(f"one mixing weight per source is needed: {alpha} for {sources}")
        if derived is not None and derived not in sources:
            raise ValueError(f"posterior.derived={derived!r} is not one of the posterior's sources {list(sources)}; "
                             f"name one of them, or null for the Gaussian mixture likelihood")
        if sleep_steps < 0:
            raise ValueError(f"posterior.sleep_steps must be >= 0, got {sleep_steps}")
        if schedule is not None and prior is None:
            raise ValueError("a prior schedule needs ``prior``, its finest level, for validation and separation")
        self.save_hyperparameters(ignore=["prior", "schedule", "bank"])
        self.sources = list(sources)
        self.net = PosteriorNet(len(self.sources), PosteriorNetConfig(**net))
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32), persistent=False)
        self.prior = prior
        self.prior_schedule = schedule
        self.bank = bank if bank is None or isinstance(bank, SleepBank) else SleepBank(bank)
        for frozen in (prior, schedule):
            if frozen is not None:
                frozen.eval()
                for parameter in frozen.parameters():
                    parameter.requires_grad_(False)
        self.strict_loading = False  # the frozen priors' weights are not in the checkpoint
        self.skipped_steps = 0
        self.skip = None

    def train(self, mode=True):
        super().train(mode)
        for frozen in (self.prior, self.prior_schedule):
            if frozen is not None:
                frozen.eval()  # frozen: their normalisation layers stay in inference mode
        return self

    def posterior(self, mix):
        return self.constrained(self.net(mix.float(), self.alpha), mix)

    def constrained(self, q, mix):
        """``q`` under the Dirac likelihood when ``derived`` names a source, else ``q`` itself."""
        if self.hparams.get("derived") is None:
            return q
        return DiracPosterior(q, mix, self.alpha, self.sources.index(self.hparams.derived))

    def kl_weight(self):
        steps = self.hparams.warmup_steps
        return 1.0 if steps == 0 else min(1.0, self.global_step / steps)

    def training_level(self):
        """(prior, score sigma or None, sigma) serving this training step: the schedule's stage at the global
        step (so a resumed run continues at its own stage), else the one frozen prior."""
        if self.prior_schedule is None:
            return self.prior, self.hparams.score_sigma, self.hparams.prior_sigma
        step = self.global_step
        return (*self.prior_schedule.at(step), self.prior_schedule.sigma(step))

    def elbo(self, mix, generator, level=None):
        """(q, ELBO terms, per-mixture ELBO [B] at weight 1, objective [B] at the warm-up weight).

        ``level``: (prior, score sigma) to score with; None = the finest, ``prior`` at ``score_sigma``."""
        prior, score_sigma = level or (self.prior, self.hparams.score_sigma)
        q = self.posterior(mix)
        uniform = torch.rand(mix.shape[0], len(self.sources), mix.shape[1], generator=generator, device=mix.device)
        terms = elbo_terms(q, prior, mix.float(), self.alpha, self.hparams.gamma, uniform, score_sigma)
        kl_part = terms["prior_objective"].sum(dim=1) + terms["entropy"].sum(dim=1)
        return q, terms, elbo_value(terms), self.kl_weight() * kl_part + terms["mixture"]

    def reference_elbo(self, mix, references, scale, generator):
        """ELBO [B] of the posterior with the true sources as its location and ``scale``."""
        low, high = -1 + 1e-3, 1 - 1e-3  # the truncated normal keeps its location inside the support
        loc = references.clamp(low, high) if self.net.config.distribution == "truncated_normal" else references
        q = self.constrained(self.net.distribution(loc, scale), mix)
        uniform = torch.rand(references.shape, generator=generator, device=mix.device)
        return elbo_value(elbo_terms(q, self.prior, mix, self.alpha, self.hparams.gamma, uniform, self.hparams.score_sigma))

    def sleep_loss(self, size, length, generator):
        """-mean log q(s | m) on ``size`` (sources, mixture) pairs of the sleep bank: the sleep phase's loss."""
        derived = self.hparams.get("derived")
        gamma = 0.0 if derived is not None else self.hparams.gamma  # the Dirac likelihood adds no noise
        sources, mix = self.bank.batch(size, length, self.alpha.cpu(), generator, gamma)
        sources, mix = sources.to(self.device), mix.to(self.device)
        q = self.net(mix, self.alpha)
        if self.net.config.distribution == "truncated_normal":  # a prior draw may step outside [-1, 1]
            sources = sources.clamp(-1 + 1e-3, 1 - 1e-3)
        log_prob = q.log_prob(sources)  # [B, N, T]
        if derived is not None:  # q's entry for the derived source is not used: the mixture gives it
            log_prob = log_prob[:, [k for k, name in enumerate(self.sources) if name != derived]]
        return -log_prob.mean()

    def finite_or_skipped(self, loss):
        """``loss``, or (when it is not finite on any rank) a zero that keeps the graph, since DDP needs every
        parameter used; the step's gradients are then dropped in on_before_optimizer_step."""
        self.skip = bool(any_rank(self, ~torch.isfinite(loss.detach()).view(1)))
        return loss.nan_to_num(0.0, 0.0, 0.0) * 0 if self.skip else loss

    def sleeping(self):
        return self.global_step < self.hparams.get("sleep_steps", 0)

    def training_step(self, batch, batch_idx):
        if "sources" in batch:
            raise ValueError("the posterior trains on mixtures only, but its training batch carries 'sources'; "
                             "wrap the datamodule in datamodules.mixtures_only.MixtureDataModule")
        seed = mix_seed(self.hparams.seed, self.global_rank, self.global_step, batch_idx)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.sleeping():
            if self.bank is None:
                raise ValueError("posterior.sleep_steps > 0 needs a sleep bank of prior draws "
                                 "(experiments/train_posterior.py builds it)")
            size, length = batch["mix"].shape
            loss = self.finite_or_skipped(self.sleep_loss(size, length, torch.Generator().manual_seed(seed)))
            if not self.skip:
                self.log("train/sleep_nll", loss.detach(), prog_bar=True)
            return loss
        prior, score_sigma, sigma = self.training_level()
        _, terms, elbo, objective = self.elbo(batch["mix"], generator, (prior, score_sigma))
        loss = self.finite_or_skipped(-objective.mean())
        if self.skip:
            return loss
        has_value = score_sigma is None  # a score prior gives the gradient of log p, not its value
        if sigma is not None:
            self.log("train/prior_sigma", float(sigma))
        if has_value:
            self.log("train/elbo", elbo.mean(), prog_bar=True)
        self.log("train/mixture", terms["mixture"].mean())
        self.log("train/kl_weight", self.kl_weight())
        for k, name in enumerate(self.sources):
            if has_value:
                self.log(f"train/prior_{name}", terms["prior"][:, k].mean())
            self.log(f"train/entropy_{name}", terms["entropy"][:, k].mean())
        return loss

    def on_before_optimizer_step(self, optimizer):
        nonfinite = any(not torch.isfinite(p.grad).all() for p in self.net.parameters() if p.grad is not None)
        if self.skip or bool(any_rank(self, torch.tensor([nonfinite], device=self.device))):
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            self.log("train/skipped_steps", float(self.skipped_steps))
        self.skip = None

    def validation_step(self, batch, batch_idx):
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        mix = batch["mix"].float()
        q, terms, elbo, _ = self.elbo(mix, generator)
        size = mix.shape[0]
        if self.hparams.score_sigma is None:
            self.log("val/elbo", elbo.mean(), sync_dist=True, batch_size=size, prog_bar=True)
        self.log("val/mixture", terms["mixture"].mean(), sync_dist=True, batch_size=size)
        if "sources" in batch:  # monitors only: nothing is selected or stopped on them
            references = batch["sources"].float()
            improvement = si_sdr(q.mean, references) - si_sdr_of_mix(mix, references)  # [B, N]
            self.log("val/si_sdri_mean", improvement.mean(), sync_dist=True, batch_size=size, prog_bar=True)
            for k, name in enumerate(self.sources):
                self.log(f"val/si_sdri_mean_{name}", improvement[:, k].mean(), sync_dist=True, batch_size=size)
            # The diagnosis of a failure: the ELBO of q centred on the true sources (same scales). When it is
            # below the trained q's, the priors and the mixture term prefer a wrong separation.
            if self.hparams.score_sigma is None:
                # The same uniforms as the trained q's ELBO above, so the two differ by q alone.
                generator = torch.Generator(device=self.device).manual_seed(batch_idx)
                reference_elbo = self.reference_elbo(mix, references, q.scale, generator)
                self.log("val/elbo_at_references", reference_elbo.mean(), sync_dist=True, batch_size=size)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        times, total = self.hparams.lr_decay_times, self.hparams.schedule_steps
        milestones = [round(total * i / (times + 1)) for i in range(1, times + 1)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.6)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(FROZEN_PREFIXES)}
        checkpoint["skipped_steps"] = self.skipped_steps
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint):
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        restore_rng_states(checkpoint)
