"""The discrimination report's pieces on handmade inputs: AUROC against a brute-force pair count, the arg-max
accuracy, the corrected scores, the lossless coder's length, the pooled dataset, and the report files."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from callbacks.discrimination import argmax_accuracy, auroc, crop_scores, detection_auroc, discrimination
from callbacks.discrimination_report import write_report
from datamodules.pooled_sources import PooledSources
from datamodules.toy import ToyDataset
from lightning_modules.metrics.coder_length import coder_length, log_step


def pair_count(positives, negatives):
    """sum over every (positive, negative) pair of [p > n] + 0.5 [p == n], nan as -inf, / pairs."""
    clean = [[-math.inf if math.isnan(v) else v for v in side] for side in (positives, negatives)]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(*clean))
    return wins / (len(positives) * len(negatives))


def test_auroc_equals_a_brute_force_pair_count():
    positives = [3.0, 1.0, 1.0, -math.inf, 7.5, math.nan]
    negatives = [1.0, 0.5, 2.0, -math.inf, 1.0, 9.0, math.nan]
    assert auroc(positives, negatives) == pytest.approx(pair_count(positives, negatives), abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        # Rounded so that ties are frequent.
        p, n = np.round(rng.normal(size=rng.integers(1, 9)), 1), np.round(rng.normal(size=rng.integers(1, 9)), 1)
        assert auroc(p, n) == pytest.approx(pair_count(p.tolist(), n.tolist()), abs=1e-12)
    assert auroc([2.0], [1.0]) == 1.0 and auroc([1.0], [2.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5
    assert math.isnan(auroc([], [1.0]))


def test_detection_and_argmax_on_a_handmade_matrix():
    # Two crops, three sources: scores[crop, data source k, prior j].
    scores = np.array([
        [[5.0, 1.0, 0.0], [2.0, 3.0, 3.0], [0.0, 0.0, 1.0]],
        [[0.0, 4.0, 0.0], [1.0, 6.0, 0.0], [2.0, 2.0, 2.0]],
    ])
    # Prior 0 scores its own crops 5, 0 against the others' 2, 0, 1, 2.
    assert detection_auroc(scores)[0] == pytest.approx(pair_count([5, 0], [2, 0, 1, 2]))
    assert detection_auroc(scores)[1] == pytest.approx(pair_count([3, 6], [1, 0, 4, 2]))
    assert detection_auroc(scores)[2] == pytest.approx(pair_count([1, 2], [0, 3, 0, 0]))
    # Source 0: crop 0 right, crop 1 wrong. Source 1: crop 0 a two-way tie (1/2), crop 1 right. Source 2:
    # crop 0 right, crop 1 a three-way tie (1/3).
    assert argmax_accuracy(scores) == pytest.approx([0.5, 0.75, (1 + 1 / 3) / 2])


def per_crop_example():
    loglik = [[[[1.0, 0.0], [0.5, 2.0]], [[3.0, 1.0], [0.0, 0.5]]]]  # one level, 2 crops, 2 sources
    return {"index": [0, 1], "sigma_model": [0.0], "loglik": loglik, "pooled": [[[0.5, 1.0], [2.5, 0.0]]],
            "coder_length": [[[4.0, 1.0], [2.0, 3.0]]],
            "coder": {"name": "FLAC", "bit_depth": 16, "log_step": -10.0, "sample_rate": 16000, "units": "nats"}}


def test_corrected_scores_are_the_documented_formulas():
    per_crop = per_crop_example()
    complexity = crop_scores(per_crop, 0, "complexity")
    ratio = crop_scores(per_crop, 0, "ratio")
    # Crop 1, source 0 (coder length 2, pooled 2.5) under prior 1 (log-lik 1).
    assert complexity[1, 0, 1] == 1.0 - 10.0 + 2.0
    assert ratio[1, 0, 1] == 1.0 - 2.5
    assert crop_scores({**per_crop, "pooled": [None]}, 0, "ratio") is None


def test_report_files_and_inputs_beside_own_data(tmp_path):
    results = {"sources": ["a", "b"], "per_crop": per_crop_example(), "inputs_table": [
        {"input": "constant 0", "sigma_model": 0.0, "loglik": [4.0, -1.0], "pooled": 1.0, "coder_length": 0.0}]}
    paths = write_report(results, tmp_path)
    for key in ("discrimination_csv", "discrimination_json", "discrimination", "discrimination_summary"):
        assert paths[key].is_file(), key
    report = json.loads(paths["discrimination_json"].read_text())
    raw = report["levels"][0]["raw"]
    # Prior a: own crops 1, 3 vs b's crops 0.5, 0 -> 1.0; prior b: own 2, 0.5 vs a's 0, 1 -> 0.75.
    assert raw["auroc"] == {"a": 1.0, "b": 0.75} and raw["worst_source"] == "b"
    rows = {(r["score"], r["prior"]): r for r in report["inputs"]}
    # Constant 0 scores 4 under prior a, above both of a's own crops (1, 3); with L = 0 it falls below them
    # (own complexity scores 1 - 10 + 4 = 3 - 10 + 2 = -5 > -6).
    assert rows[("raw", "a")]["outscores_own"] == 1.0
    assert rows[("complexity", "a")]["value"] == 4.0 - 10.0 + 0.0
    assert rows[("complexity", "a")]["outscores_own"] == 0.0
    text = paths["discrimination_summary"].read_text()
    assert "Does a correction raise the worst per-source AUROC?" in text and "| 0 | ratio |" in text
    assert paths["discrimination"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without a pooled prior the ratio rows say so instead of failing.
    no_pooled = {**results, "per_crop": {**per_crop_example(), "pooled": [None]}}
    assert "n/a (no pooled prior" in (write_report(no_pooled, tmp_path / "b")["discrimination_summary"]).read_text()
    assert discrimination(no_pooled)["levels"][0]["ratio"] is None


def test_coder_length_is_deterministic_and_orders_silence_tone_noise():
    t = torch.arange(4096) / 16000
    generator = torch.Generator().manual_seed(0)
    crops = torch.stack([torch.zeros(4096), 0.5 * torch.sin(2 * math.pi * 220 * t),
                         0.05 * torch.randn(4096, generator=generator), 0.5 * torch.randn(4096, generator=generator)])
    lengths = coder_length(crops, 16000)
    assert lengths.dtype == torch.float64 and lengths.shape == (4,)
    assert lengths[0] == 0  # silence costs nothing beyond the stream's overhead
    assert 0 < lengths[1] < lengths[2] < lengths[3]
    # Quantised Gaussian noise cannot be coded below its entropy, log(std * sqrt(2 pi e) / step).
    entropy = math.log(0.5 * math.sqrt(2 * math.pi * math.e)) - log_step(16)
    assert entropy - 0.05 < lengths[3] < entropy + 1.0
    assert torch.equal(coder_length(crops, 16000), lengths)  # deterministic
    assert torch.equal(coder_length(crops.view(2, 2, 4096), 16000).view(-1), lengths)  # per crop, any batch shape
    assert coder_length(crops[3:], 16000, bit_depth=24) > lengths[3]  # finer steps, longer code
    with pytest.raises(ValueError, match="8, 16, 24"):
        coder_length(crops, 16000, bit_depth=12)
    with pytest.raises(ValueError, match="sample rate"):
        coder_length(crops, 0)


def test_pooled_dataset_serves_every_source_once_per_example():
    base = ToyDataset("train", 3, ["sine", "square", "saw"], 64, 16000)
    pooled = PooledSources(base, 3)
    assert len(pooled) == 9
    for index in range(9):
        item = pooled[index]
        assert item["sources"].shape == (1, 64) and item["index"] == index
        assert torch.equal(item["sources"][0], base[index // 3]["sources"][index % 3])
    with pytest.raises(IndexError):
        pooled[9]


def test_wandb_gets_the_table_the_figure_and_the_worst_aurocs(tmp_path):
    import wandb

    from callbacks.discrimination_report import log_to_wandb

    class FakeRun:
        calls = []

        def log(self, payload):
            self.calls.append(payload)

    results = {"sources": ["a", "b"], "per_crop": per_crop_example(), "inputs_table": []}
    paths = write_report(results, tmp_path)
    run = FakeRun()
    log_to_wandb(results, run, paths=paths)
    payload = run.calls[0]
    assert isinstance(payload["discrimination/table"], wandb.Table) and len(payload["discrimination/table"].data) == 6
    assert isinstance(payload["discrimination/figure"], wandb.Image)
    assert payload["discrimination/worst_auroc_raw_sigma_0"] == 0.75
    assert {"discrimination/worst_auroc_complexity_sigma_0", "discrimination/worst_auroc_ratio_sigma_0"} <= set(payload)
