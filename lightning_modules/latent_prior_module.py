"""Stage 2 of the LQ-VAE family: the N per-source Transformers over the codes of the frozen stage-1 LQ-VAE.

It trains exactly like every prior family (lightning_modules/prior_module.py): maximum likelihood (of the
codes), each Transformer with its own loss, NaN guard and gradient clipping, resumable. Codes are computed
from the frozen LQ-VAE on the fly (the encoder pass is cheap beside the Transformers, and nothing on disk
can go stale). The LQ-VAE's weights are copied into this module, so its checkpoint is self-contained.
"""
import torch

from lightning_modules.nn.latent_prior import LatentPrior
from lightning_modules.prior_module import PriorModule


class LatentPriorModule(PriorModule):
    def __init__(self, model: dict, sources: list, lr: float = 1e-4, lr_decay: float = 0.6,
                 lr_decay_times: int = 5, schedule_steps: int = 150_000, noise_sigma: float = 0.0, seed: int = 0):
        super().__init__(model, sources, lr, lr_decay, lr_decay_times, schedule_steps, noise_sigma, seed)
        if not isinstance(self.prior, LatentPrior):
            raise ValueError(f"LatentPriorModule needs model.name=lqvae, got {model.get('name')!r}")
        if noise_sigma:
            raise ValueError("the latent priors model discrete codes; noise fine-tuning does not apply to them")

    def load_lqvae(self, checkpoint_path):
        """Copy the LQ-VAE weights of a finished stage-1 checkpoint (LQVAEModule's) into the frozen LQ-VAE."""
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
        lqvae_state = {key.removeprefix("lqvae."): value for key, value in state.items() if key.startswith("lqvae.")}
        if not lqvae_state:
            raise ValueError(f"{checkpoint_path} holds no LQ-VAE weights (is it a stage-1 checkpoint?)")
        self.prior.load_lqvae(lqvae_state)
