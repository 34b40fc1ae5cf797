"""What every benchmark script shares: key=value options, the device, timing that waits for the GPU, autocast
for a precision name, and writing the JSON report."""
import json
import platform
import sys
import time

import torch

from datamodules.atomic_io import atomic_write_text


def parse_options(argv, options):
    """key=value arguments into ``options`` (its keys are the known ones); False after an error message."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in options:
            print(f"error: unknown option {key!r}; known: {sorted(options)}", file=sys.stderr)
            return False
        options[key] = value
    return True


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, steps, device, warmup=True):
    """Seconds per call of ``fn``, after one untimed call unless ``warmup=False``."""
    if warmup:
        fn()  # warm-up (and data-dependent ActNorm init)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def autocast(device, precision):
    """Autocast for a precision name: bf16 / bf16-mixed, 16 / 16-mixed; anything else is float32."""
    precision = str(precision)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def write_bench(options, device, results):
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "precision": options["precision"], "results": results,
    }
    atomic_write_text(options["output"], json.dumps(report, indent=2))
    print(f"written to {options['output']}")
    return 0
