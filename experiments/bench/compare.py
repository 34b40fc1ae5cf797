"""``make bench-compare``: the current tree against a git revision, side by side in one run.

    python -m experiments.bench.compare against=<revision> [cases=toy_flow:default:train,...] [rounds=3]
                                        [steps=3] [output=runs/bench_compare.json] [paper_batch=1]
                                        [paper_crop=0] [wavenet_paper_crop=4096] [chains=16] [seconds=1.0]
                                        [batch=N] [crop=N] [compile=1]

The revision is checked out in a temporary git worktree (removed afterwards). Every round runs every
case once in each tree, each run a fresh process of ``experiments/bench/case.py`` from *this* tree, so
both trees are timed by the same code; the order of the two trees alternates from round to round so
that neither always runs first. Per case and tree: min and median seconds per step over every timed
step, and the speed-up ``theirs / ours`` of each. Each run also reports a check value (the
log-likelihood of a fixed batch under fixed weights, or a digest of the Langevin estimates): the two
trees must agree on it, else the comparison is not of the same computation and the run says so.

A case is ``experiment:preset:kind`` with kind ``train`` (one Adam step on -log p), ``loglik`` (log p
of a batch, no gradient) or ``langevin`` (one SGLD step: the prior's input gradient for every chain,
the mixture term and the noise). On CPU the paper presets run with batch ``paper_batch`` and the paper
WaveNet with ``wavenet_paper_crop``-sample crops, as ``make bench`` does; ``batch``/``crop`` set the
shape of every prior case, ``compile=1`` times ``torch.compile``d log-likelihoods in both trees.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from datamodules.atomic_io import atomic_write_text
from experiments.bench.common import parse_options

ROOT = Path(__file__).resolve().parents[2]
CASE_SCRIPT = Path(__file__).resolve().parent / "case.py"
DEFAULT_CASES = ",".join(
    f"{experiment}:{preset}:{kind}"
    for experiment in ("toy_flow", "toy_wavenet") for preset in ("default", "paper") for kind in ("train", "loglik")
) + ",toy_flow:default:langevin,toy_score:default:langevin"
CHECK_DIGITS = 5


def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def case_arguments(case, options):
    """``experiment:preset:kind`` -> bench_case arguments, with the CPU-sized paper shapes."""
    parts = case.split(":")
    if len(parts) != 3:
        raise ValueError(f"a case is experiment:preset:kind, got {case!r}")
    experiment, preset, kind = parts
    args = [f"kind={kind}", f"experiment={experiment}", f"preset={preset}", f"steps={options['steps']}",
            f"chains={options['chains']}", f"seconds={options['seconds']}"]
    if preset == "paper" and kind != "langevin":
        crop = options["wavenet_paper_crop"] if "wavenet" in experiment else options["paper_crop"]
        args += [f"batch={options['paper_batch']}", f"crop={crop}"]
    # batch= / crop= set every prior case's shape (e.g. tiny ones in tests); the last value wins.
    args += [f"{key}={options[key]}" for key in ("batch", "crop", "compile") if options[key]]
    return args


def run_case(tree, args):
    """One fresh process timing one case inside ``tree``; {'times': [...], 'check': ...}."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-P", str(CASE_SCRIPT), *args], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench case {args} failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_check(a, b, digits=CHECK_DIGITS):
    """Equal to ``digits`` significant digits (numbers, or nested lists of them)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_check(x, y, digits) for x, y in zip(a, b))
    scale = max(abs(a), abs(b), 1e-3)  # values near zero: compare absolutely at 1e-3 * 10^-digits
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= scale * 10 ** -digits


def summarize(times_ours, times_theirs, checks_ours, checks_theirs):
    ours = {"min": min(times_ours), "median": statistics.median(times_ours), "times": times_ours}
    theirs = {"min": min(times_theirs), "median": statistics.median(times_theirs), "times": times_theirs}
    return {
        "ours_seconds": ours, "theirs_seconds": theirs,
        "speedup_min": theirs["min"] / ours["min"], "speedup_median": theirs["median"] / ours["median"],
        "check_ours": checks_ours[0], "check_theirs": checks_theirs[0],
        "same_computation": all(same_check(a, b) for a in checks_ours for b in checks_theirs),
    }


def compare(against_tree, cases, options, log=print):
    trees = {"ours": ROOT, "theirs": against_tree}
    times = {case: {"ours": [], "theirs": []} for case in cases}
    checks = {case: {"ours": [], "theirs": []} for case in cases}
    for round_index in range(int(options["rounds"])):
        order = ("ours", "theirs") if round_index % 2 == 0 else ("theirs", "ours")
        for case in cases:
            for name in order:
                result = run_case(trees[name], case_arguments(case, options))
                times[case][name] += result["times"]
                checks[case][name].append(result["check"])
                log(f"round {round_index + 1} {case} {name}: "
                    + " ".join(f"{t:.3f}" for t in result["times"]) + " s/step", flush=True)
    return {case: summarize(times[case]["ours"], times[case]["theirs"], checks[case]["ours"], checks[case]["theirs"])
            for case in cases}


def table(results):
    lines = ["| case | ours min / median s | theirs min / median s | speed-up (min) | speed-up (median) | same result |",
             "|---|---|---|---|---|---|"]
    for case, r in results.items():
        lines.append(f"| {case} | {r['ours_seconds']['min']:.3f} / {r['ours_seconds']['median']:.3f} "
                     f"| {r['theirs_seconds']['min']:.3f} / {r['theirs_seconds']['median']:.3f} "
                     f"| {r['speedup_min']:.2f}x | {r['speedup_median']:.2f}x | {'yes' if r['same_computation'] else 'NO'} |")
    return "\n".join(lines)


def main(argv):
    options = {"against": "", "cases": DEFAULT_CASES, "rounds": "3", "steps": "3", "output": "runs/bench_compare.json",
               "paper_batch": "1", "paper_crop": "0", "wavenet_paper_crop": "4096", "chains": "16", "seconds": "1.0",
               "batch": "", "crop": "", "compile": ""}
    if not parse_options(argv, options):
        return 2
    if not options["against"]:
        print("error: say which revision to compare with: against=<git revision> (e.g. against=HEAD~3)", file=sys.stderr)
        return 2
    revision = git("rev-parse", "--verify", "--quiet", options["against"] + "^{commit}")
    if revision.returncode != 0:
        print(f"error: {options['against']!r} is not a git revision of {ROOT}; try `git log --oneline`", file=sys.stderr)
        return 2
    commit = revision.stdout.strip()
    cases = [case for case in options["cases"].split(",") if case]
    for case in cases:
        try:
            case_arguments(case, options)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="bench_compare_") as scratch:
        tree = Path(scratch) / "tree"
        added = git("worktree", "add", "--detach", str(tree), commit)
        if added.returncode != 0:
            print(f"error: could not check out {commit} in a worktree:\n{added.stderr}", file=sys.stderr)
            return 1
        try:
            results = compare(tree, cases, options)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            git("worktree", "remove", "--force", str(tree))
    head = git("rev-parse", "HEAD").stdout.strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    import torch
    report = {"against": options["against"], "against_commit": commit, "ours_commit": head, "ours_uncommitted_changes": dirty,
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "options": options, "results": results}
    atomic_write_text(options["output"], json.dumps(report, indent=2))
    print(table(results))
    print(f"written to {options['output']}")
    return 0 if all(r["same_computation"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
