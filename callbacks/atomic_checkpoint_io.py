"""Checkpoint writer that never leaves a half-written or non-finite checkpoint behind.

The checkpoint is written to a temporary file in the target folder, fsynced, then renamed over the
old one (``os.replace`` is atomic on POSIX), so a process killed mid-save keeps the previous file.
"""
import os
import tempfile
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def non_finite_tensors(state_dict):
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise RuntimeError(f"refusing to write checkpoint {path}: non-finite weights in {bad[:5]}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        # Our checkpoints hold tensors and plain containers only.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
