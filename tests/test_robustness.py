"""NaN guard, atomic checkpoints, and (slow) resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from callbacks import atomic_checkpoint_io
from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from lightning_modules.prior_module import PriorModule
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"name": "flowavenet", "n_blocks": 1, "n_flows": 1, "n_layers": 1, "width": 4}


def batches(n, poison=()):
    out = []
    for i in range(n):
        x = torch.randn(2, 2, 32)
        if i in poison:
            x[0, 0, 3] = float("nan")
        out.append({"sources": x})
    return DataLoader(out, batch_size=None)  # already batched


def test_non_finite_loss_skips_the_step(tmp_path):
    module = PriorModule(TINY_MODEL, ["sine", "saw"], lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, train_dataloaders=batches(4, poison={1, 2}))
    assert module.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    trainer.save_checkpoint(tmp_path / "ok.ckpt")
    assert (tmp_path / "ok.ckpt").is_file()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def killed_mid_write(obj, stream):
        stream.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(atomic_checkpoint_io.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="non-finite weights"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}},
                                             tmp_path / "bad.ckpt")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_killed_training_resumes_and_completes(tmp_path):
    overrides = TINY + [f"output_root={tmp_path}", "trainer.max_steps=80", "trainer.checkpoint_every_n_steps=5"]
    command = [sys.executable, "-m", "experiments.cli", "train", *overrides]
    run_dir = tmp_path / "toy_flow" / "default" / "noiseless"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "last.ckpt").is_file():
            try:
                step = torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"]
            except Exception:  # a reader may race the rename; try again
                step = 0
            if step >= 20:
                break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 20 <= step < 80, "the run should be killed mid-way"
    assert not (run_dir / "done.json").exists()

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring states from the checkpoint" in resumed.stderr
    done = json.loads((run_dir / "done.json").read_text())
    assert done["global_step"] == 80


def test_a_resumed_run_keeps_the_metrics_logged_before(tmp_path):
    from experiments.fitting import keep_metrics_history

    logs = tmp_path / "logs"
    logs.mkdir()
    for part in ("first", "second"):
        (logs / "metrics.csv").write_text(part)
        keep_metrics_history(tmp_path)
    assert (logs / "metrics_part0.csv").read_text() == "first" and (logs / "metrics_part1.csv").read_text() == "second"
    assert not (logs / "metrics.csv").exists()
    keep_metrics_history(tmp_path)  # nothing to keep: no error
