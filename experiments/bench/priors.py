"""``make bench``: training and log-likelihood throughput of the prior presets, as JSON.

    python -m experiments.bench.priors [output=runs/bench.json] [experiments=toy_flow,toy_wavenet]
                                [presets=default,paper] [steps=3] [device=auto] [precision=32]
                                [paper_batch_size=...] [paper_crop_length=...]

Throughput is audio seconds per wall-clock second, counting every source's audio (a batch of B
examples with N sources of T samples is B*N*T/sample_rate audio seconds). For the default presets it
also compares the grouped module against N separate single-prior modules, the measurement behind
our layout choice; for WaveNet it measures ancestral sampling with and without the activation cache.
On CPU the paper presets run with batch 1 (and WaveNet with shorter crops): say so when quoting them.
"""
import json
import sys

import torch

from experiments.bench.common import autocast, parse_options, pick_device, time_it, write_bench
from experiments.config import load_config, to_dict
from lightning_modules.prior_registry import build_prior, resolve_model_config





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


def bench_preset(experiment, preset, device, precision, steps, batch_size=None, crop_length=None):
    config = load_config(experiment, preset)
    n_sources = len(config.data.sources)
    length = crop_length or config.data.crop_length
    batch_size = batch_size or config.data.batch_size
    audio_seconds = batch_size * n_sources * length / config.data.sample_rate
    batch = torch.rand(batch_size, n_sources, length, device=device) * 1.6 - 0.8
    torch.manual_seed(0)
    grouped = build_prior(to_dict(config.model), n_sources).to(device)
    train_grouped, eval_grouped = measure([grouped], batch, device, precision, steps)
    result = {
        "experiment": experiment, "preset": preset, "model": resolve_model_config(to_dict(config.model)), "batch_size": batch_size,
        "crop_length": length, "n_sources": n_sources, "parameters": sum(p.numel() for p in grouped.parameters()),
        "train_seconds_per_step": train_grouped,
        "train_audio_seconds_per_second": audio_seconds / train_grouped,
        "loglik_audio_seconds_per_second": audio_seconds / eval_grouped,
    }
    if preset == "default":
        separate = [build_prior(to_dict(config.model), 1).to(device) for _ in range(n_sources)]
        train_separate, eval_separate = measure(separate, batch, device, precision, steps)
        result["separate_modules"] = {
            "train_audio_seconds_per_second": audio_seconds / train_separate,
            "loglik_audio_seconds_per_second": audio_seconds / eval_separate,
        }
    if config.model.name == "wavenet":
        result["sampling"] = bench_sampling(grouped.eval(), device)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def bench_sampling(wavenet, device, cached_length=2000, uncached_length=200):
    """Generated samples per second (one example, every prior at once; a sample = one time step of
    one prior). Uncached generation is O(T^2), so it is timed on a shorter sequence."""
    out = {}
    for cached, length in ((True, cached_length), (False, uncached_length)):
        seconds = time_it(lambda: wavenet.sample(1, length, cached=cached), 1, device)
        out["cached" if cached else "uncached"] = {
            "length": length, "samples_per_second": wavenet.n_priors * length / seconds}
    return out





def main(argv):
    options = {"output": "runs/bench.json", "experiments": "toy_flow,toy_wavenet", "presets": "default,paper",
               "steps": "3", "device": "auto", "precision": "32", "paper_batch_size": "", "paper_crop_length": ""}
    if not parse_options(argv, options):
        return 2
    device = pick_device(options["device"])
    # Full paper batches of 16384-sample crops need tens of GiB of activations: on CPU use batch 1.
    on_cpu = device.type != "cuda"
    paper_batch = int(options["paper_batch_size"] or (1 if on_cpu else 0)) or None
    paper_crop = int(options["paper_crop_length"] or 0) or None
    results = []
    for experiment in options["experiments"].split(","):
        for preset in options["presets"].split(","):
            paper = preset == "paper"
            # The paper WaveNet (width 256, 30 layers at full rate) takes minutes per 16384-sample step on CPU.
            crop = paper_crop or (4096 if paper and on_cpu and experiment == "toy_wavenet" else None)
            print(f"benchmarking {experiment} preset {preset} on {device} ...", flush=True)
            results.append(bench_preset(experiment, preset, device, options["precision"], int(options["steps"]),
                                        paper_batch if paper else None, crop if paper else None))
            print(json.dumps(results[-1], indent=2), flush=True)
    return write_bench(options, device, results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
