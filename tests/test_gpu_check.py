"""make gpu-check, run as on a GPU but on the CPU with tiny shapes (tiny=1): every part and item reports real,
finite measurements, and a part that reaches its time limit says so while the others still run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_measures_every_part(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.bench.gpu_check", "tiny=1", f"output={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["parts"]) == ["env", "train", "loglik", "samplers", "compile"]
    assert all(part["status"] == "ok" for part in report["parts"].values()), report["parts"]
    train = report["parts"]["train"]["items"]
    assert set(train) == {"flow bf16", "flow fp32", "wavenet bf16", "score bf16", "lqvae stage 1 bf16",
                          "lqvae stage 2 bf16", "posterior bf16"}
    for item in train.values():
        assert math.isfinite(item["loss_before"]) and math.isfinite(item["loss_after"]) and item["steps_per_s"] > 0
    assert train["flow bf16"]["speedup_vs_fp32"] > 0 and train["flow fp32"]["precision"] == "32"
    for item in report["parts"]["loglik"]["items"].values():
        assert item["finite"] and item["mean_abs_diff_nats_per_sample"] >= 0
    samplers = report["parts"]["samplers"]["items"]
    assert len(samplers) == 4 and all(item["s_per_audio_s"] > 0 for item in samplers.values())
    assert samplers["basis (flow, 10 x 100 steps, 10 chains)"]["extrapolated"]
    assert all(item["compile_s"] > 0 for item in report["parts"]["compile"]["items"].values())
    assert "## samplers: ok" in (tmp_path / "report.md").read_text()


def test_a_part_that_reaches_its_limit_says_so_and_the_rest_still_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.bench.gpu_check", "tiny=1", "parts=env,loglik",
                           "budget=30", f"output={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1  # not every part finished
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parts"]["env"]["status"] == "ok"
    loglik = report["parts"]["loglik"]
    assert loglik["status"] == "ok, with failed items" and loglik["limit_s"] == 0
    assert loglik["items"] and all("time limit" in item["error"] for item in loglik["items"].values())


def test_gpu_check_refuses_a_machine_without_a_gpu_unless_tiny(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.bench.gpu_check", f"output={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "tiny=1" in done.stderr and not list(tmp_path.iterdir())
