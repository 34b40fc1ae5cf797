"""Checkpoint writer that never leaves a half-written or non-finite checkpoint behind: a process
killed mid-save keeps the previous file (see datamodules/atomic_io.py); and the one reader, which names a
damaged file instead of raising the unpickler's traceback."""
import pickle
import zipfile
from pathlib import Path

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
        return read_checkpoint(path, map_location)


class CheckpointError(ValueError):
    pass


def read_checkpoint(path, map_location="cpu"):
    """Our checkpoints hold tensors and plain containers only (``weights_only=True``). A truncated or
    foreign file (a copy cut short, a disk that filled up) is named, with what to do about it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train it first")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}): it is damaged or not one of ours; "
                              f"delete it to retrain that run from its start") from None
