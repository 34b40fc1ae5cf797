"""Checkpoint writer that never leaves a half-written or non-finite checkpoint behind: a process
killed mid-save keeps the previous file (see datamodules/atomic_io.py)."""
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.atomic_io import atomic_write


def non_finite_tensors(state_dict):
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise RuntimeError(f"refusing to write checkpoint {path}: non-finite weights in {bad[:5]}")
        atomic_write(path, lambda stream: torch.save(checkpoint, stream), binary=True)

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        # Our checkpoints hold tensors and plain containers only.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
