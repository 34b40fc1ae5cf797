import csv
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

# A model and data small enough that a whole train -> finetune -> cross-likelihood run takes seconds.
TINY = [
    "model.n_blocks=2", "model.n_flows=2", "model.n_layers=2", "model.width=8",
    "data.crop_length=256", "data.eval_length=256", "data.batch_size=8", "data.eval_batch_size=4",
    "data.n_train=64", "data.n_val=8", "data.n_test=7",
    "optim.lr=3e-3", "trainer.accelerator=cpu", "trainer.max_steps=60", "trainer.val_check_interval=20",
    "trainer.limit_val_batches=2", "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "finetune.max_steps=20", "finetune.val_check_interval=10", "finetune.patience=2",
    "cross_likelihood.n_test=7", "cross_likelihood.n_input_examples=1", "wandb.enabled=false",
]


TINY_WAVENET = [o for o in TINY if not o.startswith("model.")] + [
    "model.name=wavenet", "model.n_blocks=1", "model.n_layers=4", "model.width=8", "model.n_classes=32",
]

TINY_SCORE = [o for o in TINY if not o.startswith("model.")] + [
    "model.name=score", "model.net=dilated", "model.n_layers=3", "model.width=8", "model.embed_dim=16",
    "model.squeeze=4", "model.ema_decay=null",
]

TINY_LQVAE = [o for o in TINY if not o.startswith("model.")] + [
    "model.name=lqvae", "model.vq_width=16", "model.res_depth=1", "model.strides=[4,4]", "model.codebook_size=16",
    "model.code_dim=8", "model.fft_sizes=[64]", "model.width=16", "model.n_layers=1", "model.n_heads=2",
    "model.context=16", "lqvae.lr=3e-3", "lqvae.max_steps=40", "lqvae.val_check_interval=10", "lqvae.n_test=7",
]

# A tiny variational posterior, trained on the ELBO alone (no sleep phase) against the noiseless tiny prior.
TINY_POSTERIOR = ["posterior.max_steps=30", "posterior.val_check_interval=10", "posterior.width=8",
                  "posterior.n_layers=3", "posterior.n_val=4", "posterior.batch_size=4", "posterior.lr=3e-3",
                  "posterior.prior_sigma=0", "posterior.sleep_steps=0"]


def logged(run_dir, key):
    """Every value of ``key`` in a run's logs/metrics.csv, in order."""
    with open(Path(run_dir) / "logs" / "metrics.csv") as stream:
        return [float(row[key]) for row in csv.DictReader(stream) if row.get(key)]


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny tensor calls: a second intra-op thread only adds synchronisation (up to ~20x
    slower on a busy machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"output_root={tmp_path / 'runs'}"]


@pytest.fixture
def tiny_config(tiny_overrides):
    from experiments.config import load_config

    return load_config("toy_flow", "default", tiny_overrides)
