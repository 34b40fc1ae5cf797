"""Early stopping and best-weight keeping per prior, for noise fine-tuning.

The N priors of a family share one module but are independent models, so each is judged on its own
validation log-likelihood (``val/loglik_<source>``): prior k's best weights are kept from the check
where it scored highest, and training stops once every prior has gone ``patience`` checks without
improving. ``restore_best`` then puts each prior's best slice back into the module, so the finished
run holds every prior at its own best step (recorded by ``summary``).
"""
import math

import pytorch_lightning as pl
import torch

from lightning_modules.prior_module import per_prior


class PerPriorEarlyStopping(pl.Callback):
    def __init__(self, sources, patience):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.sources, self.patience = list(sources), int(patience)
        n = len(self.sources)
        self.best_value = [-math.inf] * n
        self.best_step = [None] * n
        self.wait = [0] * n
        self.best_weights = {}  # parameter name -> CPU copy whose row k is prior k's best

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        n = len(self.sources)
        improved = []
        for k, name in enumerate(self.sources):
            value = trainer.callback_metrics.get(f"val/loglik_{name}")
            value = float(value) if value is not None else math.nan
            if math.isfinite(value) and value > self.best_value[k]:
                self.best_value[k], self.best_step[k], self.wait[k] = value, trainer.global_step, 0
                improved.append(k)
            else:
                self.wait[k] += 1
        if improved:
            rows = torch.tensor(improved)
            for pname, p in pl_module.named_parameters():
                current = per_prior(p.detach(), n).cpu()
                if pname not in self.best_weights:
                    self.best_weights[pname] = current.clone()
                else:
                    self.best_weights[pname][rows] = current[rows]
        stop = all(w >= self.patience for w in self.wait)
        trainer.should_stop = trainer.should_stop or trainer.strategy.reduce_boolean_decision(stop, all=False)

    @torch.no_grad()
    def restore_best(self, pl_module):
        """Put each prior's best weights back (priors that never validated keep their last weights)."""
        n = len(self.sources)
        rows = [k for k in range(n) if self.best_step[k] is not None]
        if not rows or not self.best_weights:
            return
        for pname, p in pl_module.named_parameters():
            per_prior(p, n)[rows] = self.best_weights[pname][rows].to(p.device, p.dtype)

    def summary(self):
        return {name: {"best_step": self.best_step[k], "best_val_loglik": self.best_value[k],
                       "checks_without_improvement": self.wait[k]}
                for k, name in enumerate(self.sources)}

    def state_dict(self):
        # Plain lists and tensors only, so a resumed run loads it with weights_only=True.
        return {"best_value": list(self.best_value), "best_step": list(self.best_step), "wait": list(self.wait),
                "best_weights": dict(self.best_weights)}

    def load_state_dict(self, state_dict):
        self.best_value = list(state_dict["best_value"])
        self.best_step = list(state_dict["best_step"])
        self.wait = list(state_dict["wait"])
        self.best_weights = dict(state_dict["best_weights"])
