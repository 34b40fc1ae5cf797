"""One timed case of ``make bench-compare``, run as a script inside the tree being measured.

    PYTHONPATH=<tree> python <this file> kind=train|loglik|langevin experiment=toy_flow preset=default
                                         [batch=0] [crop=0] [steps=3] [chains=16] [seconds=1.0] [compile=0]

``bench_compare`` runs this same file against the current tree and against a git revision checked out
in a temporary worktree, so both are timed by identical code; it only calls what every revision since
the priors landed has (``load_config``, ``build_prior``, ``LevelScore``, ``LangevinSeparator``).

Prints one JSON line: the seconds of every timed step and a ``check`` value: the mean log-likelihood
of a fixed batch under deterministically perturbed weights (train, loglik), or a digest of the
separation estimates after the timed steps (langevin). Equal checks mean both trees computed the same
quantity.
"""
import json
import sys
import time

import torch

from experiments.config import load_config, to_dict
from lightning_modules.prior_registry import build_prior

# The WaveNet under Langevin needs a density in every sample.
LANGEVIN_OVERRIDES = {"wavenet": ["model.likelihood=smoothed"]}


def perturbed_prior(config, n_sources, batch):
    """The seed-0 prior with ActNorm initialised on ``batch`` and every weight moved by a fixed draw, so
    that the log-likelihood check exercises every layer (zero-initialised outputs would hide them)."""
    torch.manual_seed(0)
    prior = build_prior(to_dict(config.model), n_sources)
    prior.train()
    with torch.no_grad():
        if not hasattr(prior, "score"):  # (a score prior's log_prob is an ODE solve, and it needs no init)
            prior.log_prob(batch)  # data-dependent initialisation, where the family has one
        generator = torch.Generator().manual_seed(1)
        for _, parameter in sorted(prior.named_parameters()):
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return prior


def timed(step, steps):
    step()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def prior_case(kind, config, batch_size, crop, steps, compiled=False):
    n_sources = len(config.data.sources)
    generator = torch.Generator().manual_seed(2)
    batch = torch.rand(batch_size or config.data.batch_size, n_sources, crop or config.data.crop_length,
                       generator=generator) * 1.6 - 0.8
    prior = perturbed_prior(config, n_sources, batch)
    with torch.no_grad():
        check = prior.log_prob(batch).double().mean().item()
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-4)
    log_prob = torch.compile(prior.log_prob) if compiled else prior.log_prob

    def train_step():
        loss = -log_prob(batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def loglik_step():
        log_prob(batch)

    return timed(train_step if kind == "train" else loglik_step, steps), check


def langevin_case(config, chains, seconds, steps):
    try:
        from lightning_modules.samplers.langevin import LangevinSeparator, sgld_levels
        from lightning_modules.samplers.level_score import LevelScore
        from lightning_modules.samplers.mixing import mixing_weights
    except ModuleNotFoundError:  # a revision from before the samplers had their own package (bench-compare)
        from lightning_modules.langevin import LangevinSeparator, mixing_weights, sgld_levels
        from lightning_modules.level_score import LevelScore

    n_sources = len(config.data.sources)
    multiple = 16
    length = round(seconds * config.data.sample_rate / multiple) * multiple
    generator = torch.Generator().manual_seed(2)
    prior = perturbed_prior(config, n_sources, torch.rand(2, n_sources, length, generator=generator) - 0.5)
    prior.eval().requires_grad_(False)
    mix = torch.rand(1, length, generator=generator) - 0.5
    # A noise-conditional score prior answers score(x, sigma) itself (no autograd); a likelihood prior
    # is differentiated through LevelScore.
    noise_conditional = hasattr(prior, "score")
    score_model = prior if noise_conditional else LevelScore([(0.0, prior)])
    levels = sgld_levels(1e-5, 0.1, 1, prior_sigma=0.05 if noise_conditional else 0.0)
    separator = LangevinSeparator(score_model, levels, mixing_weights("mean", n_sources))
    estimates = []
    times = timed(lambda: estimates.append(separator(mix, chains, [0])[0]), steps)
    last = estimates[-1].double()
    return times, [last.mean().item(), last.abs().mean().item(), last.flatten()[:: max(1, last.numel() // 7)].tolist()]


def main(argv):
    options = {"kind": "train", "experiment": "toy_flow", "preset": "default", "batch": "0", "crop": "0",
               "steps": "3", "chains": "16", "seconds": "1.0", "compile": "0"}
    # (Not experiments.bench.parse_options: this script runs on the other tree's modules, which may lack it.)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in options:
            print(f"error: unknown option {key!r}; known: {sorted(options)}", file=sys.stderr)
            return 2
        options[key] = value
    kind, steps = options["kind"], int(options["steps"])
    if kind == "langevin":
        family = load_config(options["experiment"], options["preset"]).model.name
        config = load_config(options["experiment"], options["preset"], LANGEVIN_OVERRIDES.get(family, []))
        times, check = langevin_case(config, int(options["chains"]), float(options["seconds"]), steps)
    elif kind in ("train", "loglik"):
        config = load_config(options["experiment"], options["preset"])
        times, check = prior_case(kind, config, int(options["batch"]), int(options["crop"]), steps,
                                  compiled=options["compile"] == "1")
    else:
        print(f"error: unknown kind {kind!r}; choose train, loglik or langevin", file=sys.stderr)
        return 2
    print(json.dumps({"times": times, "check": check}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
