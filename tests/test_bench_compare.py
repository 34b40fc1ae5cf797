"""make bench-compare: two trees timed side by side, and the check that they computed the same thing."""
import json
import math
import os
import subprocess
import sys

from experiments.bench.compare import ROOT, main, same_check


def test_same_check_compares_to_five_significant_digits():
    assert same_check(-2.3456781, -2.3456789)
    assert not same_check(-2.34567, -2.34587)
    assert same_check([1.0, [2.0, 3.0]], [1.0, [2.0, 3.0000001]])
    assert not same_check([1.0, 2.0], [1.0, 2.0, 3.0])
    assert not same_check(math.nan, math.nan)
    assert same_check(1e-9, -1e-9)  # both zero to 1e-8 absolute


def test_bad_revision_is_refused_and_nothing_is_written(tmp_path, capsys):
    output = tmp_path / "bench_compare.json"
    assert main([f"output={output}"]) == 2
    assert "against=" in capsys.readouterr().err
    assert main(["against=no-such-revision-xyz", f"output={output}"]) == 2
    assert "not a git revision" in capsys.readouterr().err
    assert main(["against=HEAD", "cases=toy_flow:default", f"output={output}"]) == 2
    assert not output.exists()


def test_side_by_side_run_flags_a_tree_that_computes_something_else(tmp_path):
    """A clone whose WaveNet scores differently, against this repository's HEAD: the flow's Langevin
    step must agree, the WaveNet case must be flagged, every case timed in both trees, the worktree removed."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    wavenet = clone / "lightning_modules/nn/wavenet.py"
    text = wavenet.read_text()
    assert "mu_law_encode(x, self.cfg.n_classes - 1)" in text
    wavenet.write_text(text.replace("mu_law_encode(x, self.cfg.n_classes - 1)", "mu_law_encode(0.9 * x, self.cfg.n_classes - 1)"))
    output = tmp_path / "compare.json"
    cases = "toy_wavenet:default:loglik,toy_flow:default:langevin"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench.compare", "against=HEAD", f"cases={cases}", "rounds=1", "steps=2",
         "batch=1", "crop=256", "chains=1", "seconds=0.02", f"output={output}"],
        cwd=clone, env={**os.environ, "PYTHONPATH": str(clone)}, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # a case computed something else
    results = json.loads(output.read_text())["results"]
    assert results["toy_flow:default:langevin"]["same_computation"]
    assert not results["toy_wavenet:default:loglik"]["same_computation"]
    for result in results.values():
        assert len(result["ours_seconds"]["times"]) == len(result["theirs_seconds"]["times"]) == 2
        assert result["speedup_min"] > 0 and math.isfinite(result["speedup_median"])
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=clone, capture_output=True, text=True).stdout
    assert len(worktrees.strip().splitlines()) == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert json.loads(output.read_text())["against_commit"] == head
