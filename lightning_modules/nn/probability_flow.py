"""Exact log-likelihood of a noise-conditional denoiser prior by the probability-flow ODE.

A denoiser D(x, sigma) ~ E[x_0 | x_0 + sigma * eps] (EDM, variance-exploding, sigma(t) = t) defines the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, whose marginals are the noisy densities
p_sigma = p_data * N(0, sigma^2 I) (Song et al. 2021; Karras et al. 2022). In s = log(sigma) it reads

    dx/ds = f(x, s) = x - D(x, e^s),

and the instantaneous change of variables gives, along a trajectory,

    d log p_{e^s}(x(s)) / ds = -div_x f = -(T - div_x D(x, e^s)).

Starting at the data point x(s0) = x with s0 = log(sigma_min) and integrating to s1 = log(sigma_max),

    log p_{sigma_min}(x) = log N(x(s1); 0, (sigma_max^2 + sigma_data_k^2) I_T) + int_{s0}^{s1} div_x f ds.

The prior variance sigma_max^2 + sigma_data_k^2 is the exact p_{sigma_max} for Gaussian data of variance
sigma_data_k^2, so the formula is exact there, and its error vanishes as sigma_max grows otherwise.

Channel k of x: [B, N, T] is an independent prior, so the Jacobian of D is block-diagonal over (b, k)
and every divergence is a [B, N] tensor. ``exact`` takes the trace with T one-hot probes (the same e_t in
all B * N blocks reads B * N diagonal entries in one vector-Jacobian product); ``hutchinson`` uses
E[v^T J v] with Rademacher probes v drawn once, so the ODE stays deterministic. Probes are evaluated in one
batched denoiser call on stacked copies of x, which is valid because batch rows are independent.
The solver is an adaptive Dormand-Prince RK45 on the augmented state (x, delta_logp). Channels share its
step-size controller, so their results are independent only up to the solver tolerance.
"""
import math

import torch

DIVERGENCES = ("auto", "exact", "hutchinson")

# Dormand-Prince 5(4) tableau; the last row of _A equals the 5th-order weights (first same as last).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - b_low for b, b_low in zip(_A[6] + (0.0,), _B_LOW))


def gaussian_log_prob(x, var):
    """Total log N(x; 0, var I) over the last axis: x [..., T], var broadcastable to x.shape[:-1]."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * ((x**2).sum(-1) / var + x.shape[-1] * torch.log(2 * math.pi * var))


def _batched_vjp(denoise, x, sigma, cotangents):
    """D(x) [B, N, T] and u^T J for every cotangent u in [C, B, N, T], from one call on C copies of x."""
    x_copies = x.detach().repeat(cotangents.shape[0], 1, 1).requires_grad_(True)
    with torch.enable_grad():
        out = denoise(x_copies, sigma)
        grad = None
        if out.requires_grad:  # a D that ignores x has no graph, and a zero Jacobian
            (grad,) = torch.autograd.grad(out, x_copies, cotangents.reshape(x_copies.shape), allow_unused=True)
    grad = torch.zeros_like(x_copies) if grad is None else grad
    return out[: x.shape[0]].detach(), grad.reshape(cotangents.shape)


def exact_divergence(denoise, x, sigma, chunk_size=64):
    """(D(x, sigma), tr dD/dx per (b, k) [B, N]) with T one-hot probes, chunk_size of them per call."""
    batch, n_sources, length = x.shape
    trace, denoised = x.new_zeros(batch, n_sources), None
    for start in range(0, length, chunk_size):
        times = torch.arange(start, min(start + chunk_size, length), device=x.device)
        onehots = torch.nn.functional.one_hot(times, length).to(x.dtype)
        cotangents = onehots[:, None, None, :].expand(-1, batch, n_sources, -1)
        denoised, rows = _batched_vjp(denoise, x, sigma, cotangents)
        trace = trace + (rows * cotangents).sum(dim=(0, 3))
    return denoised, trace


def hutchinson_divergence(denoise, x, sigma, probes):
    """(D(x, sigma), mean over probes v [P, B, N, T] of v^T (dD/dx) v per (b, k) [B, N])."""
    denoised, rows = _batched_vjp(denoise, x, sigma, probes)
    return denoised, (rows * probes).sum(dim=-1).mean(dim=0)


def rademacher_probes(shape, seed, dtype, device):
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, tuple(shape), generator=generator) * 2 - 1
    return signs.to(dtype=dtype, device=device)


def _initial_step(y, dy, span, rtol, atol):
    """Hairer's first guess: a step that moves y by about 1% of its own scale."""
    scale = atol + rtol * y.abs()
    d0, d1 = (y / scale).pow(2).mean().sqrt().item(), (dy / scale).pow(2).mean().sqrt().item()
    step = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    return min(step, span)


def dormand_prince(f, y, t0, t1, rtol, atol, max_steps, safety=0.9, min_factor=0.2, max_factor=10.0):
    """Integrate dy/dt = f(t, y) from t0 to t1 > t0; returns (y(t1), number of f evaluations)."""
    k_first, evaluations, t = f(t0, y), 1, t0
    step = _initial_step(y, k_first, t1 - t0, rtol, atol)
    for _ in range(max_steps):
        if t >= t1:
            return y, evaluations
        last = step >= t1 - t
        step = t1 - t if last else step
        ks, y_stage = [k_first], y
        for i in range(1, 7):
            y_stage = y + step * sum(a * k for a, k in zip(_A[i], ks) if a)
            ks.append(f(t + _C[i] * step, y_stage))
        evaluations += 6
        error = step * sum(e * k for e, k in zip(_E, ks) if e)
        scale = atol + rtol * torch.maximum(y.abs(), y_stage.abs())
        error_norm = (error / scale).pow(2).mean().sqrt().item()
        if error_norm <= 1.0:  # the 7th stage is at the new point: y_stage is the 5th-order solution
            t, y, k_first = (t1 if last else t + step), y_stage, ks[6]
        factor = max_factor if error_norm == 0 else safety * error_norm**-0.2
        step *= min(max(factor, min_factor), max_factor if error_norm <= 1.0 else 1.0)
    if t >= t1:
        return y, evaluations
    raise RuntimeError(
        f"probability-flow ODE did not reach s={t1:.4g} in max_steps={max_steps} (stopped at s={t:.4g}, "
        f"step {step:.3g}); loosen rtol/atol or raise max_steps"
    )


def _choose_divergence(divergence, length, exact_max_length):
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if divergence == "auto":
        return "exact" if length <= exact_max_length else "hutchinson"
    return divergence


def ode_log_prob(denoise, x, sigma_min, sigma_max, sigma_data, divergence="auto", n_probes=1, rtol=1e-4,
                 atol=1e-4, probe_seed=0, exact_max_length=256, max_steps=10_000, exact_chunk_size=64):
    """log p_{sigma_min}(x) in nats per audio sample [B, N] for x [B, N, T], and an info dict.

    denoise(x [B', N, T], sigma 0-dim tensor) -> [B', N, T] must treat batch rows and channels independently.
    divergence: "exact" (T one-hot probes), "hutchinson" (n_probes fixed Rademacher probes from probe_seed) or
    "auto" (exact when T <= exact_max_length). info records the method, n_probes (None when exact), the
    tolerances, the sigma range and function_evaluations, the number of ODE right-hand sides evaluated
    (each one is ceil(T / exact_chunk_size) batched denoiser calls when exact, one when hutchinson).
    """
    method = _choose_divergence(divergence, x.shape[-1], exact_max_length)
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [batch, sources, time], got {tuple(x.shape)}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}")
    batch, n_sources, length = x.shape
    # Gradients are taken inside, so escape a caller's inference mode; the solver state itself never
    # carries a graph (no_grad), which keeps memory flat over the steps.
    with torch.inference_mode(False), torch.no_grad():
        x = x.detach().clone()
        if method == "exact":
            def divergence_fn(x_s, sigma):
                return exact_divergence(denoise, x_s, sigma, exact_chunk_size)
        else:
            probes = rademacher_probes((n_probes, batch, n_sources, length), probe_seed, x.dtype, x.device)

            def divergence_fn(x_s, sigma):
                return hutchinson_divergence(denoise, x_s, sigma, probes)

        def drift(s, state):
            x_s = state[..., :-1]
            denoised, div_denoiser = divergence_fn(x_s, torch.tensor(math.exp(s), dtype=x.dtype, device=x.device))
            return torch.cat([x_s - denoised, (length - div_denoiser).unsqueeze(-1)], dim=-1)

        state = torch.cat([x, x.new_zeros(batch, n_sources, 1)], dim=-1)
        state, evaluations = dormand_prince(drift, state, math.log(sigma_min), math.log(sigma_max), rtol, atol, max_steps)
        sigma_data = torch.as_tensor(sigma_data, dtype=x.dtype, device=x.device)
        prior_log_prob = gaussian_log_prob(state[..., :-1], sigma_max**2 + sigma_data**2)
        log_prob = (prior_log_prob + state[..., -1]) / length
    info = {"divergence": method, "n_probes": n_probes if method == "hutchinson" else None, "rtol": rtol,
            "atol": atol, "function_evaluations": evaluations, "sigma_min": sigma_min, "sigma_max": sigma_max}
    return log_prob, info
