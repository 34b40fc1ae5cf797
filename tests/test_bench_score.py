"""The score-prior bench runs end to end on a tiny network and reports finite, positive figures."""
import json
import math

import torch

from experiments.bench.score import main

TINY = ["model.net=dilated", "model.width=8", "model.n_layers=2", "model.embed_dim=16", "model.ode_divergence=hutchinson",
        "separation.diffusion_solver=heun", "separation.diffusion_churn=0", "separation.diffusion_corrections=0",
        "data.crop_length=256", "data.batch_size=2", "separation.length=256", "separation.diffusion_steps=3",
        "separation.n_chains=2",
        "repeats=1", "train_steps=1", "warmup=1", "loglik_batch_size=1", "device=cpu", "threads=1"]


def test_bench_score_reports_training_likelihood_and_separation_speed(tmp_path):
    output = tmp_path / "bench_score.json"
    threads = torch.get_num_threads()
    assert main([f"output={output}", *TINY]) == 0
    assert torch.get_num_threads() == threads  # threads=1 held for the run only
    report = json.loads(output.read_text())
    assert {"device", "device_type", "torch", "torch_threads", "precision", "settings", "results"} <= set(report)
    assert report["device_type"] == "cpu" and report["precision"] == "32" and report["torch_threads"] == 1
    assert report["settings"]["model"]["width"] == 8 and report["settings"]["n_sources"] == 4
    results = report["results"]
    figures = {
        "training": ["seconds_per_step", "steps_per_second", "audio_seconds_per_second"],
        "likelihood": ["function_evaluations", "seconds_per_example", "seconds_per_audio_second",
                       "seconds_per_function_evaluation"],
        "separation": ["seconds_per_mixture", "seconds_per_audio_second", "seconds_per_score_evaluation"],
    }
    for part, keys in figures.items():
        for key in keys:
            value = results[part][key]
            assert math.isfinite(value) and value > 0, (part, key, value)
    assert results["likelihood"]["divergence"] == "hutchinson" and results["likelihood"]["untrained_network"]
    separation = results["separation"]
    assert separation["diffusion_steps"] == 3 and separation["n_chains"] == 2 and separation["length"] == 256
    assert separation["score_evaluations"] == 5  # heun: 2 per move between the 3 levels, plus the last step to 0


def test_bench_score_refuses_unknown_options_and_other_families(tmp_path):
    output = tmp_path / "bench_score.json"
    assert main([f"output={output}", "colour=blue"]) == 2
    assert main([f"output={output}", "model.colour=blue"]) == 2
    assert main([f"output={output}", "experiment=toy_flow"]) == 2
    assert not output.exists()
