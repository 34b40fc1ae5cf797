"""L(x): the length of a crop under a generic lossless audio coder (FLAC, through soundfile), in nats per audio
sample: the input-complexity estimate of Serra et al. (ICLR 2020), "Input complexity and out-of-distribution
detection with likelihood-based generative models".

Quantisation (FLAC codes integers): x is clipped to the full scale [-1, 1 - step] and rounded to the nearest
step = 2 / 2^bit_depth (16 bits: the usual PCM_16 wav/flac convention, step 2^-15). A prior's density p(x) gives
the quantised crop a probability of about p(x) * step per sample, so the complexity-corrected score

    log p(x) + log(step) + L(x)   (nats per sample; = -S(x) of Serra et al.; higher = more typical)

is the log-ratio of the prior's code length to FLAC's. The stream overhead (header and per-frame bytes, those
of an all-zero crop of the same length) is not counted, so silence has length 0 whatever the coder's framing.
FLAC is run at its highest compression (libFLAC level 8), which is deterministic.
"""
import functools
import io
import math

import numpy as np
import soundfile
import torch

SUBTYPES = {8: "PCM_S8", 16: "PCM_16", 24: "PCM_24"}
CODER = "FLAC (soundfile, level 8)"


def describe(sample_rate, bit_depth=16):
    """What the results record about the coder, so a report can state the quantisation it used."""
    return {"name": CODER, "bit_depth": check_bit_depth(bit_depth), "log_step": log_step(bit_depth),
            "sample_rate": sample_rate, "units": "nats per sample, header overhead excluded"}


def check_bit_depth(bit_depth):
    if bit_depth not in SUBTYPES:
        raise ValueError(f"the lossless coder codes {sorted(SUBTYPES)}-bit PCM; got bit_depth={bit_depth!r}")
    return bit_depth


def log_step(bit_depth=16):
    """log of the quantisation step (nats): the density-to-probability conversion of one sample."""
    return math.log(2.0 / 2 ** check_bit_depth(bit_depth))


def quantise(x, bit_depth=16):
    """float array [T] -> int32 PCM codes, left-aligned in 32 bits (libsndfile keeps the top bit_depth bits)."""
    levels = 2 ** (check_bit_depth(bit_depth) - 1)
    codes = np.clip(np.round(np.asarray(x, dtype=np.float64) * levels), -levels, levels - 1).astype(np.int64)
    return (codes << (32 - bit_depth)).astype(np.int32)


def flac_bytes(codes, sample_rate, bit_depth):
    buffer = io.BytesIO()
    soundfile.write(buffer, codes, int(sample_rate), format="FLAC", subtype=SUBTYPES[bit_depth],
                    compression_level=1.0)
    return len(buffer.getvalue())


@functools.lru_cache(maxsize=64)
def overhead_bytes(length, sample_rate, bit_depth):
    return flac_bytes(np.zeros(length, dtype=np.int32), sample_rate, bit_depth)


def coder_length(x, sample_rate, bit_depth=16):
    """x [..., T] (tensor) -> L(x) [...] float64 tensor, nats per sample, one FLAC stream per crop."""
    check_bit_depth(bit_depth)
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 655350):
        raise ValueError(f"FLAC needs a sample rate in (0, 655350] Hz, got {sample_rate!r}")
    flat = x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1]).numpy()
    length = flat.shape[-1]
    overhead = overhead_bytes(length, int(sample_rate), bit_depth)
    nats = [8 * math.log(2) * (flac_bytes(quantise(crop, bit_depth), sample_rate, bit_depth) - overhead) / length
            for crop in flat]
    return torch.tensor(nats, dtype=torch.float64).view(x.shape[:-1])
