"""N independent autoregressive Transformers over discrete codes, one per source class.

A decoder-only model in the GPT-2 style (pre-LayerNorm blocks, causal self-attention, GELU MLP,
learned positions, untied output head) whose N copies keep their weights grouped: every parameter
has a leading dimension N, so one batched matmul runs all N models, model k only ever touches slice
k, and training code can view any parameter or gradient as ``param.view(N, -1)`` to clip per model.

Internally activations are laid out ``[N, B, S, width]`` (group first) so each grouped linear is a
single ``baddbmm`` without copying weights; the public tensors are ``[B, N, ...]``.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    context: int = 256  # most codes one model attends over (number of learned positions)
    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0


class GroupedLinear(nn.Module):
    """N independent ``Linear(in, out)`` layers: weight ``[N, in, out]``, bias ``[N, out]``."""

    def __init__(self, n_groups, in_features, out_features, std=0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_groups, in_features, out_features) * std)
        self.bias = nn.Parameter(torch.zeros(n_groups, out_features))

    def forward(self, x):  # [N, ..., in] -> [N, ..., out]
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1])
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)
        return out.view(*shape[:-1], self.weight.shape[-1])


class GroupedLayerNorm(nn.Module):
    def __init__(self, n_groups, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_groups, width))
        self.bias = nn.Parameter(torch.zeros(n_groups, width))

    def forward(self, x):  # [N, ..., width]
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return F.layer_norm(x, x.shape[-1:]) * self.weight.view(view) + self.bias.view(view)


class KVCache:
    """Keys and values of every layer for incremental decoding of all N models at once.

    Preallocated ``[N * B, heads, context, head_dim]`` tensors per layer (rows group-major, the
    layout SDPA sees in the full forward) plus a position counter: a step writes one slot in place
    instead of concatenating, so decoding L codes costs no reallocation.
    """

    def __init__(self, n_layers, n_groups, batch, n_heads, context, head_dim, device, dtype):
        shape = (n_groups * batch, n_heads, context, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch = batch
        self.context = context
        self.position = 0  # number of codes (start token included) already fed


class CausalSelfAttention(nn.Module):
    def __init__(self, n_groups, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = GroupedLinear(n_groups, cfg.width, 3 * cfg.width)
        self.proj = GroupedLinear(n_groups, cfg.width, cfg.width, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, layer=0):  # x [N, B, S, width]
        groups, batch, length, width = x.shape
        head_dim = width // self.n_heads
        qkv = self.qkv(x).view(groups, batch, length, 3, self.n_heads, head_dim)
        # -> [3, N * B, heads, S, head_dim]: each (group, example) is its own SDPA batch row, so
        # attention never mixes models.
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, groups * batch, self.n_heads, length, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # One new position attends to everything cached before it, hence no mask.
            pos = cache.position
            cache.keys[layer][:, :, pos:pos + length] = k
            cache.values[layer][:, :, pos:pos + length] = v
            past_k = cache.keys[layer][:, :, :pos + length].to(q.dtype)  # cache may differ under autocast
            past_v = cache.values[layer][:, :, :pos + length].to(q.dtype)
            out = F.scaled_dot_product_attention(q, past_k, past_v, dropout_p=dropout_p)
        out = out.view(groups, batch, self.n_heads, length, head_dim).transpose(2, 3)
        return self.resid_dropout(self.proj(out.reshape(groups, batch, length, width)))


class Block(nn.Module):
    def __init__(self, n_groups, cfg):
        super().__init__()
        self.ln_attn = GroupedLayerNorm(n_groups, cfg.width)
        self.attn = CausalSelfAttention(n_groups, cfg)
        self.ln_mlp = GroupedLayerNorm(n_groups, cfg.width)
        self.fc = GroupedLinear(n_groups, cfg.width, 4 * cfg.width)
        self.fc_out = GroupedLinear(n_groups, 4 * cfg.width, cfg.width, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.mlp_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_attn(x), cache, layer)
        return x + self.mlp_dropout(self.fc_out(F.gelu(self.fc(self.ln_mlp(x)))))


class GroupedTransformer(nn.Module):
    """N autoregressive models over codes in ``[0, K)``; index K of the token table is the start token."""

    def __init__(self, n_groups: int, cfg: TransformerConfig):
        super().__init__()
        if cfg.width % cfg.n_heads:
            raise ValueError(f"width {cfg.width} is not divisible by n_heads {cfg.n_heads}")
        self.n_groups = n_groups
        self.cfg = cfg
        self.token_embedding = nn.Parameter(torch.randn(n_groups, cfg.vocab_size + 1, cfg.width) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(n_groups, cfg.context, cfg.width) * 0.02)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(n_groups, cfg) for _ in range(cfg.n_layers))
        self.ln_out = GroupedLayerNorm(n_groups, cfg.width)
        # Untied head with a bias, so the code marginal need not be carried by the residual stream.
        self.head = GroupedLinear(n_groups, cfg.width, cfg.vocab_size)

    @property
    def start_token(self):
        return self.cfg.vocab_size

    def _check_codes(self, codes, what):
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must be an integer tensor of code indices, got {codes.dtype}")
        if codes.dim() < 2 or codes.shape[1] != self.n_groups:
            raise ValueError(f"{what} must have the group dim {self.n_groups} at dim 1, got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{what} hold values outside [0, {self.cfg.vocab_size}) "
                             f"(range [{int(codes.min())}, {int(codes.max())}])")

    def _embed(self, tokens, first_position):  # tokens [N, B, S] incl. start token -> [N, B, S, width]
        groups, length = tokens.shape[0], tokens.shape[-1]
        rows = self.cfg.vocab_size + 1
        # Offset each group into its own rows of the flattened table so one lookup serves all N.
        offsets = torch.arange(groups, device=tokens.device).view(groups, 1, 1) * rows
        x = F.embedding(tokens + offsets, self.token_embedding.view(groups * rows, -1))
        x = x + self.position_embedding[:, None, first_position:first_position + length]
        return self.embed_dropout(x)

    def _logits(self, x):  # [N, B, S, width] -> [B, N, S, K]
        return self.head(self.ln_out(x)).transpose(0, 1)

    def forward(self, codes):
        """codes ``[B, N, S]`` -> logits ``[B, N, S, K]`` (a transposed view; use ``reshape``).
        ``logits[:, k, s]`` is model k's prediction of ``codes[:, k, s]`` from ``codes[:, k, :s]``."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [batch, groups, length], got shape {tuple(codes.shape)}")
        self._check_codes(codes, "codes")
        if codes.shape[2] > self.cfg.context:
            raise ValueError(f"sequence of {codes.shape[2]} codes is longer than the Transformer context "
                             f"{self.cfg.context}; crop the sequence or train with a larger context")
        tokens = codes.long().transpose(0, 1)
        tokens = torch.cat([torch.full_like(tokens[..., :1], self.start_token), tokens[..., :-1]], dim=-1)
        x = self._embed(tokens, 0)
        for block in self.blocks:
            x = block(x)
        return self._logits(x)

    def log_prob_codes(self, codes):
        """``[B, N, S]`` -> ``[B, N]``: each model's log-likelihood of its whole code sequence (float32)."""
        log_probs = self(codes).float().log_softmax(dim=-1)
        return log_probs.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1).sum(dim=-1)

    def new_cache(self, batch, device=None, dtype=None):
        cfg = self.cfg
        param = self.token_embedding
        return KVCache(cfg.n_layers, self.n_groups, batch, cfg.n_heads, cfg.context, cfg.width // cfg.n_heads,
                       device if device is not None else param.device, dtype if dtype is not None else param.dtype)

    def step(self, previous, cache):
        """Feed the code emitted at the previous step (``[B, N]``; ``None`` or the start token at the
        first step) and return logits ``[B, N, K]`` for the next code; appends to ``cache`` in place."""
        if cache.position >= cache.context:
            raise ValueError(f"the cache already holds {cache.position} positions, the whole Transformer "
                             f"context {cache.context}; no further code can be predicted")
        if previous is None:
            if cache.position:
                raise ValueError("previous may be None only at the first step")
        else:
            if tuple(previous.shape) != (cache.batch, self.n_groups):
                raise ValueError(f"previous must be [{cache.batch}, {self.n_groups}], got {tuple(previous.shape)}")
            if cache.position == 0:
                # Any other token here would condition the first code on a past that never happened.
                if not bool((previous == self.start_token).all()):
                    raise ValueError(f"at the first step previous must be None or the start token {self.start_token}")
            else:
                self._check_codes(previous, "previous")
        return self._step(previous, cache)

    def _step(self, previous, cache):  # unchecked, for the sampling loop (no host syncs per step)
        if previous is None:
            tokens = torch.full((self.n_groups, cache.batch, 1), self.start_token,
                                device=cache.keys[0].device, dtype=torch.long)
        else:
            tokens = previous.long().transpose(0, 1).unsqueeze(-1)
        x = self._embed(tokens, cache.position)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        cache.position += 1
        return self._logits(x)[:, :, 0]

    @torch.no_grad()
    def sample(self, batch, length, generator=None, temperature=1.0):
        """Ancestral sampling of ``[B, N, length]`` codes with the key/value cache. Dropout follows the
        module's mode, so call ``eval()`` first; ``generator`` must live on the model's device."""
        if length > self.cfg.context:
            raise ValueError(f"sequence of {length} codes is longer than the Transformer context "
                             f"{self.cfg.context}; sample at most {self.cfg.context} codes")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        cache = self.new_cache(batch)
        codes = torch.empty(batch, self.n_groups, length, dtype=torch.long, device=self.token_embedding.device)
        previous = None
        for t in range(length):
            probs = (self._step(previous, cache).float() / temperature).softmax(dim=-1)
            previous = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(batch, -1)
            codes[:, :, t] = previous
        return codes
