"""Vector-quantisation bottleneck B_Q with EMA codebook updates and restarts of dead codes.

Paper 002 section 3 (eq. 2-4); the EMA update replaces the gradient of the codebook loss (van den Oord et
al. 2017, appendix A.1; Jukebox), so ``codebook_loss`` is reported, not trained:

    n_k <- decay * n_k + (1 - decay) * (number of latents assigned to code k)
    m_k <- decay * m_k + (1 - decay) * (sum of the latents assigned to code k)
    e_k  = m_k / n~_k,   n~_k = (n_k + eps) / (sum_j n_j + K eps) * sum_j n_j   (Laplace smoothing)

A code whose running count n_k falls below ``restart_threshold`` is dead: it is moved onto a random latent
of the current batch (and its statistics reset to that latent), so the codebook stays in use. Under DDP the
assignment statistics are summed over ranks and rank 0's restarts are broadcast, so every rank keeps the
same codebook.
"""
import torch
import torch.distributed as dist
from torch import nn


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size, code_dim, decay=0.99, eps=1e-5, restart_threshold=1.0):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.decay, self.eps, self.restart_threshold = decay, eps, restart_threshold
        self.register_buffer("codebook", torch.zeros(codebook_size, code_dim))
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", torch.zeros(codebook_size, code_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def nearest(self, h):
        """Indices of the nearest codes: h [..., D] -> [...] (squared Euclidean distance, in float32)."""
        flat = h.reshape(-1, self.code_dim).float()
        codebook = self.codebook.float()
        # Autocast would run the product in half precision (bf16 keeps 8 significant bits): near ties would flip.
        with torch.autocast(flat.device.type, enabled=False):
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
        return distances.argmin(dim=1).view(h.shape[:-1])

    def lookup(self, indices):
        """Codes of the indices: [...] -> [..., D]."""
        return self.codebook[indices]

    def quantise(self, h):
        """B_Q without gradients or updates: h [B, D, S] -> nearest codes [B, D, S], the codebook's own
        float32 values (not rounded to a half-precision h's dtype: distances to them are taken next)."""
        return self.lookup(self.nearest(h.transpose(1, 2))).transpose(1, 2)

    def forward(self, h, update=False):
        """h [B, D, S] -> (quantised with straight-through gradients [B, D, S], indices [B, S], commit loss).

        ``update`` applies the EMA step with these latents (training only). The commit loss is
        mean((h - sg[e])^2) over every element."""
        latents = h.transpose(1, 2)  # [B, S, D]
        if update:
            self.ema_update(latents.detach().reshape(-1, self.code_dim).float())
        indices = self.nearest(latents)
        codes = self.lookup(indices).to(h.dtype)
        commit = (latents - codes.detach()).pow(2).mean()
        quantised = latents + (codes - latents).detach()  # straight-through: the gradient of B_Q is identity
        return quantised.transpose(1, 2), indices, commit

    @torch.no_grad()
    def ema_update(self, latents):
        """One EMA step from latents [M, D] (the formula in the module docstring), then restarts. A batch
        with a non-finite latent is left out (the training step it belongs to is skipped)."""
        finite = torch.isfinite(latents).all().reshape(1).float()
        if distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            return
        if not bool(self.initialised):
            self.restart(latents, torch.ones(self.codebook_size, dtype=torch.bool, device=latents.device))
            self.initialised.fill_(True)
        indices = self.nearest(latents)
        one_hot = nn.functional.one_hot(indices, self.codebook_size).to(latents.dtype)  # [M, K]
        counts, sums = one_hot.sum(0), one_hot.t() @ latents
        if distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.restart(latents, self.ema_count < self.restart_threshold)

    @torch.no_grad()
    def restart(self, latents, dead):
        """Move the ``dead`` codes [K] bool onto random latents of this batch; their statistics restart at
        one assignment of that latent."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # Enough candidates even when the batch has fewer latents than dead codes (repeated, then jittered).
        repeats = -(-n_dead // latents.shape[0])
        candidates = latents.repeat(repeats, 1)
        candidates = candidates[torch.randperm(candidates.shape[0], device=latents.device)[:n_dead]]
        if repeats > 1:
            candidates = candidates + 0.01 * candidates.std() * torch.randn_like(candidates)
        self.codebook[dead] = candidates
        self.ema_sum[dead] = candidates
        self.ema_count[dead] = 1.0
        if distributed():
            for buffer in (self.codebook, self.ema_sum, self.ema_count):
                dist.broadcast(buffer, src=0)

    def dead_codes(self):
        """How many codes are below the restart threshold now."""
        return int((self.ema_count < self.restart_threshold).sum())


def perplexity(counts):
    """exp(entropy) of a code-usage histogram [..., K] (K = every code used equally; 1 = one code)."""
    probs = counts.double() / counts.double().sum(-1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return entropy.exp()
