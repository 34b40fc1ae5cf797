"""``make gpu-check``: one prepared run that measures the paper presets on a GPU -> <output>/report.{json,md}.

    python -m experiments.bench.gpu_check [output=runs/gpu_check] [tiny=0] [budget=420]
                                          [parts=env,train,loglik,samplers,compile]

Each part runs in its own process under its own share of ``budget`` seconds, so one slow or failing part cannot
take the others with it (a part that runs out is reported as such, with what it finished). No dataset and no
network: synthetic batches at the presets' shapes, random weights (speed does not depend on them).

* env: torch, CUDA and cuDNN versions, every visible GPU's name and memory.
* train: every paper preset (flow, WaveNet, score, LQ-VAE stage 1 and stage 2, variational posterior) for a few
  optimizer steps under bf16-mixed; with several GPUs, DDP over all of them (one process per GPU). Steps/s,
  audio s/s, peak memory, and the loss of a fixed batch before and after the steps (finite, lower). The flow
  also in fp32, so the bf16 speed-up is a ratio from the same run.
* loglik: each family's log_prob of a fixed batch in fp32 and under bf16-mixed: the difference in nats/sample.
* samplers: BASIS, diffusion (ISDM settings), the latent posterior (64 candidates, K = 2048) and the variational
  posterior on 3 s of mixture: a few steps timed and extrapolated to the full schedule (marked as such), in
  seconds per second of audio, beside the published anchors.
* compile: torch.compile of the flow's training step and of the score prior's score call, against eager.

``tiny=1`` runs the same code on the CPU with tiny shapes in well under a minute (a test in ``make test``):
bf16 autocast on the CPU, and compile with the ``aot_eager`` backend (the wiring without code generation).
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from datamodules.atomic_io import atomic_write_text
from experiments.bench.common import parse_options

PARTS = ("env", "train", "loglik", "samplers", "compile")
# Shares of the budget after env's fixed slice: training and the samplers are the long parts.
SHARES = {"train": 0.35, "loglik": 0.15, "samplers": 0.3, "compile": 0.2}
ENV_SECONDS = 30
ANCHORS = {"diffusion": "ISDM: 18.4 s per 12 s of audio on an RTX A6000 (1.53 s/s)",
           "latent": "LQ-VAE paper: 3 min per 3 s of audio on an RTX 3080 (60 s/s)"}


def limits(names, budget):
    rest = max(budget - (ENV_SECONDS if "env" in names else 0), 0.0)
    total = sum(SHARES[n] for n in names if n != "env") or 1.0
    return {n: ENV_SECONDS if n == "env" else rest * SHARES[n] / total for n in names}


def child_command(name, tiny, result, limit):
    command = ["-m", "experiments.bench.gpu_check_parts", f"part={name}", f"tiny={tiny}", f"result={result}",
               f"limit={limit:.0f}"]
    gpus = torch.cuda.device_count() if not tiny else 0
    if name == "train" and gpus > 1:  # one process per GPU, as Lightning's DDP launches them
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *command]
    return [sys.executable, *command]


def run_part(name, tiny, limit, scratch):
    """Run one part in a child process; its partial result survives a timeout (it writes after each item)."""
    result = Path(scratch) / f"{name}.json"
    started = time.perf_counter()
    status = "ok"
    try:
        done = subprocess.run(child_command(name, tiny, result, limit), capture_output=True, text=True,
                              timeout=limit + 10)
        if done.returncode != 0:
            status = f"failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}"
    except subprocess.TimeoutExpired:
        status = f"ran out of time (limit {limit:.0f} s)"
    items = json.loads(result.read_text()) if result.is_file() else {}
    if status == "ok" and any(isinstance(v, dict) and "error" in v for v in items.values()):
        status = "ok, with failed items"
    return {"status": status, "limit_s": round(limit), "seconds": round(time.perf_counter() - started, 1),
            "items": items}


def main(argv=None):
    options = {"output": "runs/gpu_check", "tiny": "0", "budget": "420", "parts": ",".join(PARTS)}
    if not parse_options(sys.argv[1:] if argv is None else argv, options):
        return 2
    names = [n for n in options["parts"].split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {unknown}; choose from {list(PARTS)}", file=sys.stderr)
        return 2
    tiny = int(options["tiny"] not in ("", "0", "false"))
    if not tiny and not torch.cuda.is_available():
        print("error: no CUDA device visible; gpu-check measures a GPU (tiny=1 runs it on the CPU)", file=sys.stderr)
        return 2
    output = Path(options["output"])
    started = time.perf_counter()
    report = {"tiny": bool(tiny), "budget_s": float(options["budget"]), "commit": commit(), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        for name, limit in limits(names, float(options["budget"])).items():
            print(f"gpu-check: {name} (limit {limit:.0f} s) ...", flush=True)
            report["parts"][name] = run_part(name, tiny, limit, scratch)
            print(f"gpu-check: {name}: {report['parts'][name]['status']}", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(output / "report.md", markdown(report))
    print((output / "report.md").read_text())
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1  # every item measured


def commit():
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    return done.stdout.strip() or None


def fmt(value):
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def markdown(report):
    lines = [f"# gpu-check ({'tiny, CPU' if report['tiny'] else 'paper presets'}), commit {report['commit']}, "
             f"{report['seconds']} s of a {report['budget_s']:.0f} s budget", ""]
    for name, part in report["parts"].items():
        lines += [f"## {name}: {part['status']} ({part['seconds']} s, limit {part['limit_s']} s)", ""]
        items = part["items"]
        if name == "env":
            lines += [f"- {key}: {fmt(value)}" for key, value in items.items()] + [""]
            continue
        keys = sorted({k for v in items.values() if isinstance(v, dict) for k in v})
        if not keys:
            continue
        lines += ["| item | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {item} | " + " | ".join(fmt(v.get(k, "")) for k in keys) + " |"
                  for item, v in items.items() if isinstance(v, dict)]
        if name == "samplers":
            lines += ["", "Anchors: " + "; ".join(ANCHORS.values()) + ". Extrapolated rows time a few steps and "
                      "scale them to the full schedule."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.exit(main())
