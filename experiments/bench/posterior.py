"""``make bench`` (last part): speed of the variational posterior of an experiment's preset, as JSON.

    python -m experiments.bench.posterior [output=runs/bench_posterior.json] [experiment=toy_flow]
                                          [preset=default] [sources=sine,square] [steps=5] [device=auto]
                                          [key=value ...]

* training: seconds per ``make train-posterior`` step (posterior forward, prior log-likelihood of one
  sample per source, backward through both into the posterior network), at posterior.batch_size x
  posterior.crop_length;
* separation: seconds per second of mixture audio of one posterior forward pass (its mean; the samples
  cost one more elementwise draw), on 8 mixtures of data.eval_length samples.

Weights are fresh (timing does not depend on them), so no trained run is needed.
"""
import json
import platform
import sys

import torch

from datamodules.atomic_io import atomic_write_text
from datamodules.registry import dataset_mixing
from experiments.bench.common import synchronize, time_it
from experiments.config import load_config, to_dict
from experiments.train_posterior import NET_KEYS
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.posterior_module import PosteriorModule
from lightning_modules.prior_registry import build_prior


def parse(argv):
    special = {"output": "runs/bench_posterior.json", "experiment": "toy_flow", "preset": "default",
               "sources": "", "steps": "5", "device": "auto"}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        (special.__setitem__(key, value) if key in special else overrides.append(arg))
    return special, overrides


def main(argv=None):
    special, overrides = parse(sys.argv[1:] if argv is None else argv)
    config = load_config(special["experiment"], special["preset"], overrides)
    device = torch.device("cuda" if special["device"] == "auto" and torch.cuda.is_available()
                          else "cpu" if special["device"] == "auto" else special["device"])
    sources = special["sources"].split(",") if special["sources"] else list(config.data.sources)
    prior = SourceSubset(build_prior(to_dict(config.model), len(config.data.sources)), list(config.data.sources),
                         sources)
    post = config.posterior
    module = PosteriorModule(net={key: post[key] for key in NET_KEYS}, sources=sources,
                             alpha=mixing_weights(dataset_mixing(config.data.name), len(sources)).tolist(),
                             gamma=post.gamma, prior=prior).to(device)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=post.lr)
    batch, crop = post.batch_size or config.data.batch_size, post.crop_length or config.data.crop_length
    generator = torch.Generator(device=device).manual_seed(0)
    train_mix = 0.5 * torch.randn(batch, crop, device=device).tanh()
    eval_mix = 0.5 * torch.randn(8, config.data.eval_length, device=device).tanh()

    def train_step():
        *_, objective = module.elbo(train_mix, generator)
        optimizer.zero_grad(set_to_none=True)
        (-objective.mean()).backward()
        optimizer.step()

    @torch.no_grad()
    def separate():
        module.posterior(eval_mix).mean

    steps = int(special["steps"])
    step_seconds = time_it(train_step, steps, device)
    separate_seconds = time_it(separate, steps, device)
    synchronize(device)
    audio_seconds = eval_mix.numel() / config.data.sample_rate
    result = {
        "experiment": config.experiment, "preset": config.preset, "sources": sources, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(), "batch": batch, "crop_length": crop,
        "train_seconds_per_step": step_seconds,
        "separation_seconds_per_audio_second": separate_seconds / audio_seconds,
        "separation_mixtures": 8, "separation_length": config.data.eval_length,
    }
    atomic_write_text(special["output"], json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
