"""The parts of ``make gpu-check`` (experiments/bench/gpu_check.py), each run in a process of its own:

    python -m experiments.bench.gpu_check_parts part=train tiny=0 result=<json> limit=<seconds>

The result file is rewritten after every item, so a part stopped at its limit still reports what it finished.
An item that fails is recorded with its error and the part goes on with the next one.
"""
import json
import math
import os
import sys
import time

import torch

from datamodules.atomic_io import atomic_write_text
from experiments.bench.common import autocast as common_autocast
from experiments.bench.common import parse_options, synchronize, time_it
from experiments.config import load_config, to_dict
from lightning_modules.prior_registry import build_prior

# CPU-sized models for tiny=1 (the same code path, seconds instead of minutes).
TINY = {
    "toy_flow": ["model.n_blocks=1", "model.n_flows=2", "model.n_layers=2", "model.width=8"],
    "toy_wavenet": ["model.n_blocks=1", "model.n_layers=3", "model.width=8", "model.n_classes=32"],
    "toy_score": ["model.unet_widths=[8,16,16]", "model.unet_factors=[4,2]", "model.unet_blocks=1",
                  "model.embed_dim=16", "model.squeeze=4"],
    "toy_lqvae": ["model.vq_width=8", "model.res_depth=1", "model.strides=[4,4]", "model.codebook_size=16",
                  "model.code_dim=8", "model.fft_sizes=[64]", "model.width=16", "model.n_layers=1",
                  "model.n_heads=2", "model.context=16", "lqvae.crop_length=512", "lqvae.batch_size=2"],
}
TINY_DATA = ["data.crop_length=512", "data.batch_size=2", "posterior.width=8", "posterior.n_layers=2"]
FAMILIES = ("toy_flow", "toy_wavenet", "toy_score", "toy_lqvae")


class Context:
    def __init__(self, tiny, limit, result):
        self.tiny, self.result, self.items = tiny, result, {}
        self.deadline = time.perf_counter() + limit
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if tiny:
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def config(self, experiment, *extra):
        overrides = (TINY[experiment] + TINY_DATA if self.tiny else []) + list(extra)
        return load_config(experiment, "default" if self.tiny else "paper", overrides)

    def steps(self, paper, tiny=1):
        return tiny if self.tiny else paper

    def run(self, name, measure):
        if time.perf_counter() > self.deadline:
            self.items[name] = {"error": "not run: the part's time limit was reached"}
        else:
            try:
                self.items[name] = measure()
            except Exception as error:  # a failing item is a result too; the next one still runs
                self.items[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.rank == 0:
            atomic_write_text(self.result, json_dump(self.items))


def json_dump(items):
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return json.dumps({k: {kk: clean(vv) for kk, vv in v.items()} if isinstance(v, dict) else v
                       for k, v in items.items()}, indent=2)


def synthetic_sources(batch, n_sources, length, device, seed=0):
    """Sines of random frequency, amplitude and phase per source: a learnable fixed batch (noise would not be)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 16000
    freq = 100 + 900 * torch.rand(batch, n_sources, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(batch, n_sources, 1, generator=generator)
    amplitude = 0.5 + 0.4 * torch.rand(batch, n_sources, 1, generator=generator)
    return (amplitude * torch.sin(2 * math.pi * freq * t + phase)).to(device)


def autocast(ctx, bf16):
    return common_autocast(ctx.device, "bf16" if bf16 else "32")


def timed(ctx, fn, steps):
    """Seconds per call (the callers warm up themselves), peak memory counted from here."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    return time_it(fn, steps, ctx.device, warmup=False)


def peak_gib(ctx):
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else float("nan")


def prior_loss(prior):
    """The family's training loss per prior [B, N]: its own (score matching), else -log p (as PriorModule)."""
    training_loss = getattr(prior, "training_loss", None)
    if training_loss is not None:
        return lambda x, generator: training_loss(x, generator)
    return lambda x, generator: -prior.log_prob(x)


class LossOf(torch.nn.Module):
    """``loss_fn(model, x, generator)`` as a module's forward, so that DDP sees the forward it synchronises."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, generator):
        return self.loss_fn(self.model, x, generator)


def train_item(ctx, model, loss_fn, batch, lr, sample_rate, bf16=True, steps=5):
    """Adam steps on ``batch``: speed, memory, and the fixed-batch loss before and after (same noise draw)."""
    wrapped = LossOf(model, loss_fn).to(ctx.device).train()
    trained = wrapped
    if ctx.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[ctx.device.index])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def fixed_loss():
        wrapped.eval()  # deterministic: no dropout, no codebook update
        with torch.no_grad(), autocast(ctx, bf16):
            value = float(wrapped(batch, torch.Generator(ctx.device).manual_seed(1)).float().mean())
        wrapped.train()
        return value

    generator = torch.Generator(ctx.device).manual_seed(0)

    def step():
        with autocast(ctx, bf16):
            loss = trained(batch, generator).float().mean(dim=0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (and data-dependent initialisation where a family has one)
    before = fixed_loss()
    seconds = timed(ctx, step, steps)
    after = fixed_loss()
    audio = batch.numel() * ctx.world / sample_rate
    return {"precision": "bf16-mixed" if bf16 else "32", "gpus": ctx.world, "batch_per_gpu": batch.shape[0],
            "crop": batch.shape[-1], "steps": steps, "steps_per_s": 1 / seconds,
            "audio_s_per_s": audio / seconds, "peak_gib": peak_gib(ctx), "loss_before": before, "loss_after": after,
            "finite_and_lower": bool(math.isfinite(after) and after < before)}


def prior_train(ctx, experiment, bf16=True):
    config = ctx.config(experiment)
    n = len(config.data.sources)
    prior = build_prior(to_dict(config.model), n)
    batch = synthetic_sources(config.data.batch_size, n, config.data.crop_length, ctx.device)
    return train_item(ctx, prior, lambda m, x, g: prior_loss(m)(x, g), batch, float(config.optim.lr),
                      config.data.sample_rate, bf16, ctx.steps(5, 2))


def lqvae_stage1(ctx):
    from lightning_modules.lqvae_module import build_lqvae, pairs

    config = ctx.config("toy_lqvae")
    lqvae = build_lqvae(to_dict(config.model))
    crop, batch_size = config.lqvae.crop_length or config.data.crop_length, config.lqvae.batch_size
    batch = synthetic_sources(batch_size, len(config.data.sources), crop, ctx.device)

    def loss(model, x, generator):
        crops, partner = pairs(x.float())
        return model.losses(crops, partner, update=model.training)["loss"].reshape(1, 1)

    return train_item(ctx, lqvae, loss, batch, float(config.lqvae.lr), config.data.sample_rate,
                      steps=ctx.steps(5, 2))


def posterior_train(ctx):
    from experiments.train_posterior import NET_KEYS
    from lightning_modules.posterior_module import PosteriorModule
    from lightning_modules.samplers.mixing import mixing_weights

    config = ctx.config("toy_flow")
    sources, post = list(config.data.sources), config.posterior
    prior = build_prior(to_dict(config.model), len(sources)).requires_grad_(False)
    module = PosteriorModule(net={key: post[key] for key in NET_KEYS}, sources=sources,
                             alpha=mixing_weights("mean", len(sources)).tolist(), gamma=post.gamma, prior=prior)
    crop = post.crop_length or config.data.crop_length
    mix = synthetic_sources(post.batch_size or config.data.batch_size, len(sources), crop, ctx.device).mean(1)

    def loss(model, x, generator):
        return -model.elbo(x, generator)[-1].reshape(-1, 1)

    return train_item(ctx, module, loss, mix, float(post.lr), config.data.sample_rate, steps=ctx.steps(5, 2))


def part_train(ctx):
    ctx.run("flow bf16", lambda: prior_train(ctx, "toy_flow"))
    ctx.run("flow fp32", lambda: prior_train(ctx, "toy_flow", bf16=False))
    if "steps_per_s" in ctx.items["flow bf16"] and "steps_per_s" in ctx.items["flow fp32"]:
        ctx.items["flow bf16"]["speedup_vs_fp32"] = ctx.items["flow bf16"]["steps_per_s"] / ctx.items["flow fp32"]["steps_per_s"]
    ctx.run("wavenet bf16", lambda: prior_train(ctx, "toy_wavenet"))
    ctx.run("score bf16", lambda: prior_train(ctx, "toy_score"))
    ctx.run("lqvae stage 1 bf16", lambda: lqvae_stage1(ctx))
    ctx.run("lqvae stage 2 bf16", lambda: prior_train(ctx, "toy_lqvae"))
    ctx.run("posterior bf16", lambda: posterior_train(ctx))


def loglik_item(ctx, experiment):
    config = ctx.config(experiment)
    n = len(config.data.sources)
    prior = build_prior(to_dict(config.model), n).to(ctx.device).eval()
    length = min(config.data.crop_length, 512 if ctx.tiny else 65536)
    x = synthetic_sources(1 if experiment == "toy_score" else 2, n, length, ctx.device)
    with torch.no_grad():
        prior.train()
        prior.log_prob(x)  # data-dependent initialisation (ActNorm), then evaluation mode
        prior.eval()
        values = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            with autocast(ctx, bf16):
                seconds = timed(ctx, lambda: values.__setitem__(name, prior.log_prob(x).float()), 1)
            values[name + "_seconds"] = seconds
    diff = (values["fp32"] - values["bf16"]).abs()
    return {"shape": list(x.shape), "fp32_s": values["fp32_seconds"], "bf16_s": values["bf16_seconds"],
            "mean_abs_diff_nats_per_sample": float(diff.mean()), "max_abs_diff_nats_per_sample": float(diff.max()),
            "finite": bool(torch.isfinite(values["fp32"]).all() and torch.isfinite(values["bf16"]).all())}


def part_loglik(ctx):
    for experiment in FAMILIES:
        ctx.run(experiment.removeprefix("toy_"), lambda: loglik_item(ctx, experiment))


def sampler_item(ctx, experiment, build, timed_steps, full_steps, n_chains, seconds=3.0, extra=(), full_audio=None):
    """Time ``timed_steps`` of a sampler on ``seconds`` of mixture and scale to ``full_steps`` (over
    ``full_audio`` seconds, when the timed mixture is shorter than the one the full schedule separates)."""
    from lightning_modules.samplers.mixing import mixing_weights

    config = ctx.config(experiment, *extra)
    n = len(config.data.sources)
    prior = build_prior(to_dict(config.model), n).to(ctx.device).eval().requires_grad_(False)
    multiple = max(getattr(prior, "length_multiple", 1), getattr(getattr(prior, "lqvae", None), "hop", 1))
    length = max(multiple, round(seconds * config.data.sample_rate / multiple) * multiple)
    mix = synthetic_sources(1, n, length, ctx.device).mean(1)
    separator = build(prior, mixing_weights("mean", n), length).to(ctx.device)
    with autocast(ctx, True):
        wall = timed(ctx, lambda: separator(mix, n_chains, [0]), 1)
    audio = full_audio or length / config.data.sample_rate
    return {"audio_s": audio, "chains": n_chains, "timed_steps": timed_steps, "full_steps": full_steps,
            "extrapolated": timed_steps != full_steps, "s_per_audio_s": wall * full_steps / timed_steps / audio,
            "peak_gib": peak_gib(ctx)}


def part_samplers(ctx):
    from lightning_modules.samplers.langevin import LangevinSeparator, sgld_levels
    from lightning_modules.samplers.level_score import LevelScore

    k = ctx.steps(3)

    def basis(prior, alpha, length):  # one BASIS step costs one SGLD step: time k, scale to 10 levels x 100
        return LangevinSeparator(LevelScore([(0.0, prior)]), sgld_levels(1e-5, 0.1, k), alpha)

    ctx.run("basis (flow, 10 x 100 steps, 10 chains)",
            lambda: sampler_item(ctx, "toy_flow", basis, k, 1000, ctx.steps(10, 2), 1.0 if ctx.tiny else 3.0))

    def diffusion(prior, alpha, length):  # ISDM: Euler, churn 40, 2 corrections, sigma 1 -> 1e-4, 150 steps
        from lightning_modules.samplers.diffusion import DiffusionSeparator

        return DiffusionSeparator(prior, alpha, sigma_max=1.0, sigma_min=1e-4, steps=max(k, 2), solver="euler",
                                  s_churn=40.0, corrections=2)

    ctx.run("diffusion (score, ISDM settings, 150 steps)",
            lambda: sampler_item(ctx, "toy_score", diffusion, max(k, 2), 150, 1, 1.0 if ctx.tiny else 3.0))

    codes = ctx.steps(16, 2)

    def latent(prior, alpha, length):  # paper 002: 64 candidates over K = 2048, 1024 codes of 3 s
        from lightning_modules.samplers.latent_posterior import LatentSeparator

        return LatentSeparator(prior, [0, 1], alpha, length, top_k=None)

    def latent_item():  # the first ``codes`` codes timed; a 3 s mixture has sample_rate * 3 / hop of them
        config = ctx.config("toy_lqvae")
        hop = 1
        for stride in config.model.strides:
            hop *= stride
        seconds = codes * hop / config.data.sample_rate
        full = codes if ctx.tiny else round(3.0 * config.data.sample_rate / hop)
        return sampler_item(ctx, "toy_lqvae", latent, codes, full, ctx.steps(64, 4), seconds,
                            ["data.sources=[sine,square]"], full_audio=None if ctx.tiny else 3.0)

    ctx.run("latent (LQ-VAE, 64 candidates, K=2048)", latent_item)

    def variational(prior, alpha, length):
        from experiments.train_posterior import NET_KEYS
        from lightning_modules.posterior_module import PosteriorModule
        from lightning_modules.samplers.variational import VariationalSeparator

        post, sources = ctx.config("toy_flow").posterior, ["sine", "square", "saw", "triangle"]
        module = PosteriorModule(net={key: post[key] for key in NET_KEYS}, sources=sources, alpha=alpha.tolist(),
                                 gamma=post.gamma, prior=prior)
        return VariationalSeparator(module, prior)

    ctx.run("variational (posterior mean and samples)",
            lambda: sampler_item(ctx, "toy_flow", variational, 1, 1, ctx.steps(10, 2), 1.0 if ctx.tiny else 3.0))


def compile_item(ctx, fn_eager, fn_compiled, steps):
    fn_eager()  # warm-up
    eager = timed(ctx, fn_eager, steps)
    started = time.perf_counter()
    fn_compiled()
    synchronize(ctx.device)
    compile_seconds = time.perf_counter() - started
    fn_compiled()  # a second warm-up: guards on requires_grad may compile once more after the first step
    compiled = timed(ctx, fn_compiled, steps)
    return {"compile_s": compile_seconds, "eager_s_per_call": eager, "compiled_s_per_call": compiled,
            "speedup": eager / compiled}


def part_compile(ctx):
    backend = "aot_eager" if ctx.tiny else "inductor"
    steps = ctx.steps(5, 2)

    def flow_train():
        config = ctx.config("toy_flow")
        prior = build_prior(to_dict(config.model), 4).to(ctx.device)
        batch = synthetic_sources(config.data.batch_size, 4, config.data.crop_length, ctx.device)
        optimizer = torch.optim.Adam(prior.parameters(), lr=1e-4)
        with torch.no_grad():
            prior.log_prob(batch)  # ActNorm's data-dependent initialisation, outside the compiled graph
        log_prob = torch.compile(prior.log_prob, backend=backend)

        def step(fn):
            def run():
                with autocast(ctx, True):
                    loss = -fn(batch).float().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return run
        return {"backend": backend, **compile_item(ctx, step(prior.log_prob), step(log_prob), steps)}

    def score_call():
        config = ctx.config("toy_score")
        prior = build_prior(to_dict(config.model), 4).to(ctx.device).eval().requires_grad_(False)
        x = synthetic_sources(2, 4, min(config.data.crop_length, 65536), ctx.device)
        score = torch.compile(prior.score, backend=backend)

        def call(fn):
            def run():
                with torch.no_grad(), autocast(ctx, True):
                    fn(x, 0.5)
            return run
        return {"backend": backend, **compile_item(ctx, call(prior.score), call(score), steps)}

    ctx.run("flow training step", flow_train)
    ctx.run("score prior score call", score_call)


def part_env(ctx):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "device_count": torch.cuda.device_count(), "python": sys.version.split()[0]}
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info[f"gpu{index}"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    if ctx.tiny:
        info["note"] = "tiny=1: CPU run with tiny shapes; no GPU measured"
    ctx.items.update(info)
    atomic_write_text(ctx.result, json_dump(ctx.items))


def main(argv=None):
    options = {"part": "", "tiny": "0", "result": "", "limit": "60"}
    if not parse_options(sys.argv[1:] if argv is None else argv, options):
        return 2
    part = {"env": part_env, "train": part_train, "loglik": part_loglik, "samplers": part_samplers,
            "compile": part_compile}.get(options["part"])
    if part is None or not options["result"]:
        print(f"error: part= one of env, train, loglik, samplers, compile and result=<json> are needed; got {options}",
              file=sys.stderr)
        return 2
    ctx = Context(options["tiny"] not in ("", "0", "false"), float(options["limit"]), options["result"])
    torch.manual_seed(0)
    part(ctx)
    if ctx.world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.exit(main())
