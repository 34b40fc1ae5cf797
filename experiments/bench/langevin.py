"""``make bench`` (second part): Langevin separation speed and peak memory, as JSON.

    python -m experiments.bench.langevin [output=runs/bench_langevin.json] [cases=toy_flow:default,...]
                                         [chains=16] [seconds=1.0] [steps=2] [device=auto] [precision=32]

One Langevin step = one forward and backward pass of the priors over every chain, plus the mixture
term and the noise. Each case runs in its own process, so its peak memory is its own: peak resident
memory (CPU) or peak allocated GPU memory (CUDA). The priors have random weights: speed and memory do
not depend on them. The WaveNet is measured with the smoothed likelihood, the one Langevin can use.
"""
import json
import resource
import subprocess
import sys
import time

import torch

from experiments.bench.common import autocast, parse_options, pick_device, synchronize, write_bench
from experiments.config import load_config, to_dict
from lightning_modules.samplers.level_score import LevelScore
from lightning_modules.samplers.langevin import LangevinSeparator, sgld_levels
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.prior_registry import build_prior

MODEL_OVERRIDES = {"toy_wavenet": ["model.likelihood=smoothed"]}


def bench_case(experiment, preset, device, precision, steps, chains, seconds):
    config = load_config(experiment, preset, MODEL_OVERRIDES.get(experiment, []))
    n_sources = len(config.data.sources)
    prior = build_prior(to_dict(config.model), n_sources).to(device).eval().requires_grad_(False)
    multiple = getattr(prior, "length_multiple", 1)
    length = round(seconds * config.data.sample_rate / multiple) * multiple
    mix = torch.rand(1, length, device=device) - 0.5
    alpha = mixing_weights("mean", n_sources)

    def run(n_steps):
        separator = LangevinSeparator(LevelScore([(0.0, prior)]), sgld_levels(1e-5, 0.1, n_steps), alpha).to(device)
        with autocast(device, precision):
            separator(mix, chains, [0])

    run(1)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    run(steps)
    synchronize(device)
    elapsed = time.perf_counter() - started
    result = {
        "experiment": experiment, "preset": preset, "n_sources": n_sources, "chains": chains,
        "mixture_seconds": length / config.data.sample_rate, "length": length, "steps_timed": steps,
        "seconds_per_step": elapsed / steps, "steps_per_second": steps / elapsed,
        "audio_seconds_per_second": chains * n_sources * length / config.data.sample_rate * steps / elapsed,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_resident_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main(argv):
    options = {"output": "runs/bench_langevin.json", "cases": "toy_flow:default,toy_wavenet:default",
               "chains": "16", "seconds": "1.0", "steps": "2", "device": "auto", "precision": "32", "one": ""}
    if not parse_options(argv, options):
        return 2
    device = pick_device(options["device"])
    if options["one"]:  # child process: one case, JSON on stdout
        experiment, preset = options["one"].split(":")
        result = bench_case(experiment, preset, device, options["precision"], int(options["steps"]),
                            int(options["chains"]), float(options["seconds"]))
        print(json.dumps(result))
        return 0
    results = []
    for case in options["cases"].split(","):
        print(f"benchmarking Langevin steps of {case} on {device} ...", flush=True)
        child = [f"{k}={v}" for k, v in options.items() if k not in ("output", "cases", "one")]
        done = subprocess.run([sys.executable, "-m", "experiments.bench.langevin", f"one={case}", *child],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1], indent=2), flush=True)
    return write_bench(options, device, results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
