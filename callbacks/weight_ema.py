"""EMA of a prior's weights during training (``model.ema_decay``), through Lightning's ``WeightAveraging``.

The average is updated after every optimizer step; validation runs on it; checkpoints hold it as their
``state_dict`` (so likelihoods and separation load it) with the raw weights beside it (``current_model_state``),
and a resumed run restores both. The raw weights keep training. The EMA is elementwise, so the grouped priors
stay independent: each prior's average depends on its own weights only.
"""
from functools import partial

from pytorch_lightning.callbacks import WeightAveraging


def ema_update(averaged, current, num_averaged, decay):
    """averaged + (1 - decay) (current - averaged); a non-float buffer (a flag) is copied, not averaged."""
    if not averaged.is_floating_point():
        return current
    return averaged + (1 - decay) * (current - averaged)


class WeightEMA(WeightAveraging):
    def __init__(self, decay):
        if not 0 < decay < 1:
            raise ValueError(f"model.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        super().__init__(use_buffers=True, avg_fn=partial(ema_update, decay=decay))
