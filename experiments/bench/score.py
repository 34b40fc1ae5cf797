"""``make bench`` (score priors): training throughput, ODE likelihood time and diffusion separation time, as JSON.

    python -m experiments.bench.score [output=runs/bench_score.json] [experiment=toy_score] [preset=default]
                                      [train_steps=5] [warmup=2] [repeats=1] [loglik_batch_size=]
                                      [n_mixtures=1] [device=auto] [precision=auto] [threads=]
                                      [section.key=value ...]

Three figures for the score family at a preset's size (``preset=paper`` is meant for a GPU; on CPU shrink
it with overrides such as ``data.crop_length=16384 data.batch_size=1``). ``section.key=value`` arguments
override the experiment's configuration, as on the training command line.

* training: optimizer steps per second and audio seconds per second (every source's audio counted: a batch
  of B examples of N sources of T samples is B*N*T/sample_rate seconds) of denoising score matching,
  forward + backward + Adam on the preset's batch of random crops, after ``warmup`` untimed steps;
* likelihood: seconds per example of ``log_prob`` (the probability-flow ODE with the preset's divergence,
  tolerance and probes; Hutchinson beyond 256 samples), per second of its duration (its N sources scored
  together), and per ODE function evaluation. The network is untrained: its output layer starts at zero,
  so the ODE is nearly linear and takes few evaluations. The cost per evaluation is representative, the
  number of evaluations is not: a trained prior takes more (multiply by seconds_per_function_evaluation).
  It always runs in float32 (the adaptive step control needs it), on ``loglik_batch_size`` examples (the
  preset's batch on CUDA, 2 on CPU; a bigger batch is cheaper per example);
* separation: seconds per mixture of ``separation.length`` samples, and per second of mixture, of the
  diffusion posterior sampler with the configuration's ``separation.diffusion_*`` settings and
  ``separation.n_chains`` chains, a batch of ``n_mixtures`` random mixtures at once (equal mixing weights).

precision=auto is the preset's trainer.precision on CUDA (bf16-mixed for paper) and 32 on CPU; it applies
autocast to training and separation. The weights are random: speed does not depend on them (the number of
ODE evaluations aside). ``threads=`` sets torch's CPU threads for the run (default: torch's own).
"""
import json
import math
import platform
import sys

import torch

from datamodules.atomic_io import atomic_write_text
from experiments.bench.common import autocast, parse_options, pick_device, time_it
from experiments.config import ConfigError, load_config, to_dict
from lightning_modules.samplers.diffusion import DiffusionSeparator
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.prior_registry import build_prior, resolve_model_config

# (key, schema default) of the separation settings the sampler reads; getattr keeps a missing key harmless.
DIFFUSION_SETTINGS = (
    ("diffusion_steps", 50), ("diffusion_sigma_max", 5.0), ("diffusion_sigma_min", 1e-3), ("diffusion_rho", 7.0),
    ("diffusion_solver", "heun"), ("diffusion_churn", 0.0), ("diffusion_constraint", "dirac"),
    ("diffusion_gamma_scale", 1.0), ("diffusion_corrections", 0), ("diffusion_init", "noise"),
    ("diffusion_langevin_steps", 0), ("diffusion_langevin_eta", 0.1), ("n_chains", 4),
)

COUNTS = ("train_steps", "warmup", "repeats", "n_mixtures")


def random_sources(shape, device):
    return torch.rand(*shape, device=device) * 1.6 - 0.8


def bench_training(prior, config, device, precision, steps, warmup):
    batch_size, n_sources, length = config.data.batch_size, prior.n_sources, config.data.crop_length
    batch = random_sources((batch_size, n_sources, length), device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=float(config.optim.lr))
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        with autocast(device, precision):
            loss = prior.training_loss(batch, generator).float().mean(dim=0).sum()  # as PriorModule does
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    seconds = time_it(step, steps, device, warmup=False)
    audio_seconds = batch_size * n_sources * length / config.data.sample_rate
    return {"batch_size": batch_size, "crop_length": length, "steps_timed": steps, "warmup_steps": warmup,
            "seconds_per_step": seconds, "steps_per_second": 1 / seconds,
            "audio_seconds_per_second": audio_seconds / seconds}


def bench_likelihood(prior, config, device, batch_size, repeats):
    length = config.data.crop_length
    x = random_sources((batch_size, prior.n_sources, length), device)
    with torch.autocast(device.type, enabled=False):
        probe = x.clone().requires_grad_(True)  # warm-up: one denoiser call and its backward at this shape
        prior.denoise(probe, prior.cfg.sigma_min).sum().backward()
        prior.zero_grad(set_to_none=True)
        infos = []

        def evaluate():
            log_prob = prior.log_prob(x)
            if not torch.isfinite(log_prob).all():
                raise RuntimeError("log_prob of the untrained prior is not finite")
            infos.append(dict(prior.last_likelihood_info))

        seconds = time_it(evaluate, repeats, device, warmup=False)
    evaluations = sum(info["function_evaluations"] for info in infos) / len(infos)
    info = infos[-1]
    return {"batch_size": batch_size, "crop_length": length, "repeats": repeats, "method": prior.likelihood_method,
            "divergence": info["divergence"], "n_probes": info["n_probes"], "rtol": info["rtol"],
            "function_evaluations": evaluations, "seconds_per_call": seconds,
            "seconds_per_example": seconds / batch_size,
            "seconds_per_audio_second": seconds / batch_size / (length / config.data.sample_rate),
            "seconds_per_function_evaluation": seconds / evaluations,
            "untrained_network": True}  # see the module docstring: evaluations would be more once trained


def diffusion_settings(separation):
    return {key: getattr(separation, key, default) for key, default in DIFFUSION_SETTINGS}


def bench_separation(prior, config, device, precision, n_mixtures, repeats):
    settings = diffusion_settings(config.separation)
    multiple = getattr(prior, "length_multiple", 1)
    length = config.separation.length or config.data.eval_length
    length = max(multiple, round(length / multiple) * multiple)
    separator = DiffusionSeparator(
        prior, mixing_weights("mean", prior.n_sources), sigma_max=settings["diffusion_sigma_max"],
        sigma_min=settings["diffusion_sigma_min"], steps=settings["diffusion_steps"], rho=settings["diffusion_rho"],
        solver=settings["diffusion_solver"], s_churn=settings["diffusion_churn"],
        constraint=settings["diffusion_constraint"], gamma_scale=settings["diffusion_gamma_scale"],
        corrections=settings["diffusion_corrections"], init=settings["diffusion_init"],
        langevin_steps=settings["diffusion_langevin_steps"], langevin_eta=settings["diffusion_langevin_eta"],
    ).to(device)
    chains = int(settings["n_chains"])
    mix = torch.rand(n_mixtures, length, device=device) - 0.5
    seeds = list(range(n_mixtures))
    with torch.no_grad(), autocast(device, precision):
        prior.score(random_sources((n_mixtures * chains, prior.n_sources, length), device), 1.0)  # warm-up
        seconds = time_it(lambda: separator(mix, chains, seeds), repeats, device, warmup=False)
    return {**settings, "length": length, "n_mixtures": n_mixtures, "repeats": repeats,
            "score_evaluations": separator.score_evaluations, "nonfinite_steps": separator.nonfinite_steps,
            "seconds_per_batch": seconds, "seconds_per_mixture": seconds / n_mixtures,
            "seconds_per_audio_second": seconds / n_mixtures / (length / config.data.sample_rate),
            "seconds_per_score_evaluation": seconds / separator.score_evaluations}


def check_finite(results):
    bad = [f"{part}.{key}" for part, figures in results.items() if isinstance(figures, dict)
           for key, value in figures.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise RuntimeError(f"non-finite figures: {bad}")


def main(argv):
    options = {"output": "runs/bench_score.json", "experiment": "toy_score", "preset": "default",
               "train_steps": "5", "warmup": "2", "repeats": "1", "loglik_batch_size": "", "n_mixtures": "1",
               "device": "auto", "precision": "auto", "threads": ""}
    overrides = [arg for arg in argv if "." in arg.partition("=")[0]]
    if not parse_options([arg for arg in argv if arg not in overrides], options):
        return 2
    try:
        config = load_config(options["experiment"], options["preset"], overrides)
        model = resolve_model_config(to_dict(config.model))
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if model["name"] != "score":
        print(f"error: {options['experiment']} is a {model['name']!r} experiment; this bench needs the score family",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if options["threads"]:  # CPU threads for this run only (tiny networks run fastest on one)
        torch.set_num_threads(int(options["threads"]))
    try:
        return run(options, config, model, overrides)
    finally:
        torch.set_num_threads(threads)


def run(options, config, model, overrides):
    device = pick_device(options["device"])
    precision = options["precision"]
    if precision == "auto":
        precision = str(config.trainer.precision) if device.type == "cuda" else "32"
    # A whole batch through the ODE costs minutes on CPU: there, two examples stand for it.
    loglik_batch = int(options["loglik_batch_size"] or (config.data.batch_size if device.type == "cuda" else 2))
    repeats = int(options["repeats"])
    n_sources = len(config.data.sources)

    def fresh_prior():  # the same random initial weights for every part, whatever the training steps did
        torch.manual_seed(int(config.seed))
        return build_prior(to_dict(config.model), n_sources).to(device)

    prior = fresh_prior()
    settings = {"experiment": options["experiment"], "preset": options["preset"], "overrides": overrides,
                "options": {**{k: int(v) if k in COUNTS else v for k, v in options.items() if k != "output"},
                            "precision": precision,
                            "loglik_batch_size": loglik_batch, "threads": torch.get_num_threads()},
                "model": model, "n_sources": n_sources, "sample_rate": config.data.sample_rate,
                "parameters": sum(p.numel() for p in prior.parameters())}
    print(f"benchmarking score priors of {options['experiment']} preset {options['preset']} on {device} "
          f"({precision}) ...", flush=True)
    results = {"training": bench_training(prior.train(), config, device, precision, int(options["train_steps"]),
                                          int(options["warmup"]))}
    print(f"  training: {results['training']['steps_per_second']:.3g} steps/s, "
          f"{results['training']['audio_seconds_per_second']:.3g} audio s/s", flush=True)
    prior = fresh_prior().eval().requires_grad_(False)
    results["likelihood"] = bench_likelihood(prior, config, device, loglik_batch, repeats)
    print(f"  likelihood: {results['likelihood']['seconds_per_example']:.3g} s/example "
          f"({results['likelihood']['function_evaluations']:g} evaluations, untrained network)", flush=True)
    results["separation"] = bench_separation(prior, config, device, precision, int(options["n_mixtures"]), repeats)
    print(f"  separation: {results['separation']['seconds_per_audio_second']:.3g} s per audio second "
          f"({results['separation']['score_evaluations']} score evaluations)", flush=True)
    if device.type == "cuda":
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    check_finite(results)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "precision": precision, "settings": settings, "results": results,
    }
    atomic_write_text(options["output"], json.dumps(report, indent=2))
    print(f"written to {options['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
