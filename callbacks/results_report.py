"""The shared end of every report callback: once the test loop has its ``results`` (gathered over ranks), rank
zero writes the files and logs to W&B. Subclasses say how (``write`` returns the written paths)."""
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


class ResultsReport(pl.Callback):
    def __init__(self, out_dir, config=None):
        self.out_dir, self.config = out_dir, config
        self.paths = None

    def write(self, results):
        raise NotImplementedError

    def log_to_wandb(self, results, run):
        raise NotImplementedError

    def on_test_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.paths = self.write(pl_module.results)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self.log_to_wandb(pl_module.results, logger.experiment)
