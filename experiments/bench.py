"""``make bench``: training and log-likelihood throughput of the prior presets, as JSON.

    python -m experiments.bench [output=runs/bench.json] [presets=default,paper] [steps=3]
                                [device=auto] [precision=32] [paper_batch_size=...]

Throughput is audio seconds per wall-clock second, counting every source's audio (a batch of B
examples with N sources of T samples is B*N*T/sample_rate audio seconds). Also compares the grouped
module against N separate single-prior modules, the measurement behind our layout choice.
"""
import json
import platform
import sys
import time

import torch

from callbacks.atomic_io import atomic_write_text
from experiments.config import load_config, to_dict
from lightning_modules.prior_registry import build_prior


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, steps, device):
    fn()  # warm-up (and data-dependent ActNorm init)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def measure(priors_list, batch, device, precision, steps):
    """Seconds per training step and per log-likelihood evaluation of ``priors_list`` (run in turn)."""
    optimizers = [torch.optim.Adam(p.parameters(), lr=1e-4) for p in priors_list]
    chunks = batch.chunk(len(priors_list), dim=1)

    def train_step():
        for prior, optimizer, x in zip(priors_list, optimizers, chunks):
            with autocast(device, precision):
                loss = -prior.log_prob(x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def evaluate():
        for prior, x in zip(priors_list, chunks):
            with autocast(device, precision):
                prior.log_prob(x)

    return time_it(train_step, steps, device), time_it(evaluate, steps, device)


def bench_preset(preset, device, precision, steps, batch_size=None):
    config = load_config("toy_flow", preset)
    n_sources, length = len(config.data.sources), config.data.crop_length
    batch_size = batch_size or config.data.batch_size
    audio_seconds = batch_size * n_sources * length / config.data.sample_rate
    batch = torch.randn(batch_size, n_sources, length, device=device)
    torch.manual_seed(0)
    grouped = build_prior(to_dict(config.model), n_sources).to(device)
    separate = [build_prior(to_dict(config.model), 1).to(device) for _ in range(n_sources)]
    train_grouped, eval_grouped = measure([grouped], batch, device, precision, steps)
    train_separate, eval_separate = measure(separate, batch, device, precision, steps)
    result = {
        "preset": preset, "model": to_dict(config.model), "batch_size": batch_size, "crop_length": length,
        "n_sources": n_sources, "parameters": sum(p.numel() for p in grouped.parameters()),
        "train_seconds_per_step": train_grouped,
        "train_audio_seconds_per_second": audio_seconds / train_grouped,
        "loglik_audio_seconds_per_second": audio_seconds / eval_grouped,
        "separate_modules": {
            "train_audio_seconds_per_second": audio_seconds / train_separate,
            "loglik_audio_seconds_per_second": audio_seconds / eval_separate,
        },
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(argv):
    options = {"output": "runs/bench.json", "presets": "default,paper", "steps": "3", "device": "auto",
               "precision": "32", "paper_batch_size": ""}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in options:
            print(f"error: unknown option {key!r}; known: {sorted(options)}", file=sys.stderr)
            return 2
        options[key] = value
    device = torch.device("cuda" if options["device"] == "auto" and torch.cuda.is_available()
                          else ("cpu" if options["device"] == "auto" else options["device"]))
    # Full paper batches of 16384-sample crops need tens of GiB of activations: on CPU use batch 1.
    paper_batch = int(options["paper_batch_size"]) if options["paper_batch_size"] else (None if device.type == "cuda" else 1)
    results = []
    for preset in options["presets"].split(","):
        print(f"benchmarking preset {preset} on {device} ...", flush=True)
        results.append(bench_preset(preset, device, options["precision"], int(options["steps"]),
                                    paper_batch if preset == "paper" else None))
        print(json.dumps(results[-1], indent=2), flush=True)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "precision": options["precision"], "results": results,
    }
    atomic_write_text(options["output"], json.dumps(report, indent=2))
    print(f"written to {options['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
