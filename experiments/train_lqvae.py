"""The two training stages of the LQ-VAE family (paper 002): ``make train-toy-lqvae`` runs both.

    {output_root}/{experiment}/{run_name}/lqvae/           stage 1: the shared LQ-VAE (last.ckpt, config.yaml,
                                                           done.json, logs/) and report/ (lqvae_report.*)
    {output_root}/{experiment}/{run_name}/noiseless/       stage 2: the per-source Transformers (with a copy of
                                                           the frozen LQ-VAE), lqvae_source.json

Each stage resumes from its own ``last.ckpt`` and is skipped once its ``done.json`` exists. Stage 2 records
which stage-1 checkpoint it was started from and refuses to continue on a different one.
"""
import copy
import json
import logging
from pathlib import Path

import pytorch_lightning as pl

from callbacks.atomic_checkpoint_io import read_checkpoint
from datamodules.atomic_io import atomic_write_text, file_sha256
from datamodules.registry import build_datamodule, dataset_mixing
from experiments.config import ConfigError, to_dict
from experiments.fitting import family_data, family_sources, fit
from experiments.run_layout import experiment_dir, is_done, prior_dir
from experiments.trainer_factory import run_test_loop

log = logging.getLogger(__name__)


def lqvae_dir(config):
    return experiment_dir(config) / "lqvae"


def check_lqvae_config(config):
    if config.model.name != "lqvae":
        raise ConfigError(f"the LQ-VAE stages need model.name=lqvae; experiment {config.experiment} has "
                          f"{config.model.name!r} (try EXPERIMENT=toy_lqvae)")
    mixing = dataset_mixing(config.data.name)
    if config.model.lin_mixing not in (None, mixing):
        log.warning("model.lin_mixing=%s but %s mixes its sources by %s", config.model.lin_mixing,
                    config.data.name, mixing)


def train_lqvae(config):
    """Stage 1, then its report on the test set."""
    from callbacks.lqvae_report import LQVAEReport
    from lightning_modules.lqvae_module import LQVAEModule

    check_lqvae_config(config)
    run_dir = lqvae_dir(config)
    stage = config.lqvae
    config = stage1_config(config)
    pl.seed_everything(config.seed, workers=True)  # the initial weights depend on the seed only
    module = LQVAEModule(model=to_dict(config.model), sources=list(config.data.sources), lr=stage.lr,
                         lr_decay=config.optim.lr_decay, lr_decay_times=stage.lr_decay_times,
                         schedule_steps=stage.max_steps, seed=config.seed)
    fit(config, run_dir, module, stage.max_steps, stage.val_check_interval, job_type="lqvae",
        early_stopping=False)
    report_dir = run_dir / "report"
    if not (report_dir / "lqvae_report.json").is_file():
        load_finished(module, run_dir)
        datamodule = build_datamodule(config.data, seed=config.seed, n_test=stage.n_test,
                                      output_root=config.output_root)
        datamodule.setup("test")
        run_test_loop(config, module, datamodule, report_dir, "lqvae_report", [LQVAEReport(report_dir, to_dict(config))])
        log.info("LQ-VAE report written to %s", report_dir)
    return run_dir


def stage1_config(config):
    """The configuration stage 1 trains with: lqvae.crop_length / batch_size replace data's when set."""
    config = copy.deepcopy(config)
    if config.lqvae.crop_length is not None:
        config.data.crop_length = config.lqvae.crop_length
    if config.lqvae.batch_size is not None:
        config.data.batch_size = config.lqvae.batch_size
    return config


def load_finished(module, run_dir):
    """The finished stage-1 weights (a skipped fit leaves the module freshly initialised)."""
    state = read_checkpoint(Path(run_dir) / "last.ckpt")["state_dict"]
    module.load_state_dict(state)


def train_latent_priors(config, pooled=False):
    """Stage 2: the per-source Transformers over the codes of the finished stage-1 LQ-VAE (``pooled``: one
    Transformer over every source's codes, the pooled prior of the discrimination report)."""
    from lightning_modules.latent_prior_module import LatentPriorModule

    check_lqvae_config(config)
    stage1 = lqvae_dir(config)
    if not is_done(stage1):
        raise FileNotFoundError(f"no finished LQ-VAE at {stage1}; run stage 1 first "
                                f"(make train-lqvae EXPERIMENT={config.experiment} PRESET={config.preset})")
    run_dir = prior_dir(config, 0.0, pooled=pooled)
    source_file = run_dir / "lqvae_source.json"
    stage1_digest = file_sha256(stage1 / "last.ckpt")
    pl.seed_everything(config.seed, workers=True)
    module = LatentPriorModule(
        model=to_dict(config.model), sources=family_sources(config, pooled), lr=config.optim.lr,
        lr_decay=config.optim.lr_decay, lr_decay_times=config.optim.lr_decay_times,
        schedule_steps=config.trainer.max_steps, noise_sigma=0.0, seed=config.seed,
    )
    if source_file.is_file():
        recorded = json.loads(source_file.read_text())["sha256"]
        if recorded != stage1_digest:
            raise ValueError(f"the LQ-VAE at {stage1} changed since the latent priors in {run_dir} were started; "
                             f"delete {run_dir} to train them on the new codes")
    elif not is_done(run_dir):
        atomic_write_text(source_file, json.dumps({"checkpoint": str(stage1 / "last.ckpt"), "sha256": stage1_digest}))
    if not (run_dir / "last.ckpt").is_file():
        module.load_lqvae(stage1 / "last.ckpt")
    extra = {"lqvae": str(stage1), **({"pooled_sources": list(config.data.sources)} if pooled else {})}
    return fit(config, run_dir, module, config.trainer.max_steps, config.trainer.val_check_interval,
               job_type="train", early_stopping=False, extra=extra, datamodule=family_data(config, pooled))


def train_both(config, pooled=False):
    train_lqvae(config)
    return train_latent_priors(config, pooled)
