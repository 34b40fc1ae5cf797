"""Writes the cross-likelihood results of a test loop (files on rank zero, W&B tables and heatmaps)."""
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from callbacks.cross_likelihood_report import log_to_wandb, write_report


class CrossLikelihoodReport(pl.Callback):
    def __init__(self, out_dir, config=None):
        self.out_dir, self.config = out_dir, config
        self.paths = None

    def on_test_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.paths = write_report(pl_module.results, self.out_dir, self.config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_to_wandb(pl_module.results, logger.experiment, paths=self.paths)
