import csv
import json
import math
import os

os.environ["WANDB_SILENT"] = "true"

import pytest

from callbacks import cross_likelihood_report as report
from callbacks.cross_likelihood_report import (
    discrimination_margins,
    log_to_wandb,
    long_rows,
    write_report,
)

SOURCES = ["sine", "square", "saw"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NINF = float("-inf")
# 2 matrices * 3 * 3 + noise grid 2 * 3 * 3 + 3 inputs * 3 priors
EXPECTED_ROWS = 18 + 18 + 9


def make_results():
    return {
        "sources": list(SOURCES),
        "matrices": [
            # discriminates; min margin 2 (column margin of "square")
            {"sigma_model": 0.0, "sigma_data": 0.0, "count": 10,
             "loglik": [[4.0, 1.0, -2.0], [0.5, 3.0, -1e12], [-5.0, -4.0, 2.5]]},
            # "square" prefers the "sine" prior: row margin -4
            {"sigma_model": 0.077, "sigma_data": 0.077, "count": 10,
             "loglik": [[2.0, NINF, 0.0], [1.0, -3.0, -2.0], [-1.0, -6.0, 1.5]]},
        ],
        "noise_grid": {
            "sigma_model": [0.0, 0.077],
            "sigma_data": [0.0, 0.01, 0.077],
            "loglik": [
                [[4.0, 3.0, 2.5], [1.0, 0.5, 0.0], [-50.0, -40.0, -30.0]],
                [[2.0, 1.0, 1.5], [2.0, 1.0, 1.0], [1.5, 0.5, 1.0]],
            ],
        },
        "inputs_table": [
            {"input": "constant 0", "sigma_model": 0.0, "loglik": [10.0, 9.0, 8.0]},
            {"input": "constant 1", "sigma_model": 0.0, "loglik": [-1e3, -2e3, -3e3]},
            {"input": "gaussian std 0.5", "sigma_model": 0.359, "loglik": [-1.0, -2.0, -3.0]},
        ],
    }


# --------------------------------------------------------------------------- margins


def test_margins_exact_values():
    m = [[5.0, 1.0, 2.0],
         [0.0, 4.0, 3.0],
         [1.0, -1.0, 6.0]]
    out = discrimination_margins(m, ["a", "b", "c"])
    assert out["row_margin"] == {"a": 3.0, "b": 1.0, "c": 5.0}
    assert out["column_margin"] == {"a": 4.0, "b": 3.0, "c": 3.0}
    assert out["min_margin"] == 1.0
    assert out["discriminates"] is True
    assert all(type(v) is float for v in [*out["row_margin"].values(), *out["column_margin"].values()])
    assert type(out["min_margin"]) is float

    swapped = [m[1], m[0], m[2]]
    out = discrimination_margins(swapped, ["a", "b", "c"])
    assert out["discriminates"] is False
    assert out["row_margin"]["a"] == 0.0 - 4.0
    assert out["min_margin"] < 0


def test_margins_non_finite_never_crash():
    nan = float("nan")
    out = discrimination_margins([[NINF, NINF], [0.0, nan]], ["a", "b"])
    assert math.isnan(out["row_margin"]["a"])  # -inf - -inf is undecidable
    assert math.isnan(out["min_margin"])
    assert out["discriminates"] is False
    # builtin max([1.0, nan]) == 1.0 would silently ignore the unknown competitor
    out = discrimination_margins([[5.0, 1.0, nan], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]], ["a", "b", "c"])
    assert math.isnan(out["row_margin"]["a"]) and out["discriminates"] is False
    # a diverged competitor prior does not hide a genuine win
    out = discrimination_margins([[1.0, NINF], [NINF, 1.0]], ["a", "b"])
    assert out["discriminates"] is True and out["min_margin"] == math.inf


def test_margins_reject_bad_shape():
    with pytest.raises(ValueError):
        discrimination_margins([[1.0, 2.0]], ["a", "b"])


# --------------------------------------------------------------------------- long rows


def test_long_rows_layout():
    rows = long_rows(make_results())
    assert len(rows) == EXPECTED_ROWS
    assert all(list(r) == list(report.COLUMNS) for r in rows)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("matrix") == 18 and kinds.count("noise_grid") == 18 and kinds.count("inputs") == 9
    m = [r for r in rows if r["kind"] == "matrix"]
    assert m[5] == {"kind": "matrix", "source": "square", "prior": "saw",
                    "sigma_model": 0.0, "sigma_data": 0.0, "loglik": -1e12}
    grid = [r for r in rows if r["kind"] == "noise_grid"]
    assert all(r["source"] == r["prior"] for r in grid)
    assert grid[-1]["sigma_model"] == 0.077 and grid[-1]["sigma_data"] == 0.077
    inputs = [r for r in rows if r["kind"] == "inputs"]
    assert inputs[0]["source"] == "constant 0" and inputs[0]["sigma_data"] is None
    assert inputs[-1] == {"kind": "inputs", "source": "gaussian std 0.5", "prior": "saw",
                          "sigma_model": 0.359, "sigma_data": None, "loglik": -3.0}


# --------------------------------------------------------------------------- write_report


def _reject_constant(name):
    raise AssertionError(f"non-strict JSON constant {name}")


def test_write_report_files(tmp_path):
    results = make_results()
    out = tmp_path / "nested" / "report"
    config = {"checkpoint": "ckpt/last.ckpt", "n_samples": 1500}
    paths = write_report(results, out, config=config)

    assert set(paths) == {"csv", "json", "matrices", "noise_grid", "summary"}
    assert all(p.is_file() and p.parent == out for p in paths.values())

    with open(paths["csv"], newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["kind", "source", "prior", "sigma_model", "sigma_data", "loglik"]
        rows = list(reader)
    assert len(rows) == EXPECTED_ROWS
    values = [float(r["loglik"]) for r in rows]
    assert -1e12 in values and NINF in values
    assert all(r["sigma_data"] == "" for r in rows if r["kind"] == "inputs")

    data = json.loads(paths["json"].read_text(), parse_constant=_reject_constant)
    assert data["sources"] == SOURCES
    assert data["config"] == config
    assert data["matrices"][0]["loglik"] == results["matrices"][0]["loglik"]
    assert data["matrices"][1]["loglik"][0][1] == "-inf"
    assert data["noise_grid"] == results["noise_grid"]
    assert data["inputs_table"] == results["inputs_table"]
    assert [mg["discriminates"] for mg in data["margins"]] == [True, False]
    assert [mg["min_margin"] for mg in data["margins"]] == [2.0, -4.0]
    assert data["margins"][1]["sigma_model"] == 0.077
    assert data["margins"][0]["row_margin"] == {"sine": 3.0, "square": 2.5, "saw": 6.5}

    from matplotlib.image import imread

    for key in ("matrices", "noise_grid"):
        raw = paths[key].read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 1000
        img = imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

    md = paths["summary"].read_text()
    assert "discriminates: yes (min margin 2)" in md
    assert "discriminates: no (min margin -4)" in md
    assert "| sine | **4** | 1 | -2 |" in md
    assert "-1e+12" in md and "-inf" in md
    assert "## Noise grid" in md and "## Synthetic inputs" in md
    assert "| gaussian std 0.5 | 0.359 | -1 | -2 | -3 |" in md
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_write_report_all_nan_and_optional_parts(tmp_path):
    nan = float("nan")
    results = {"sources": ["a", "b"],
               "matrices": [{"sigma_model": 0.0, "loglik": [[nan, nan], [nan, nan]]}],
               "noise_grid": None, "inputs_table": []}
    paths = write_report(results, tmp_path)
    assert set(paths) == {"csv", "json", "matrices", "summary"}
    assert not (tmp_path / "noise_grid.png").exists()
    assert paths["matrices"].read_bytes()[:8] == PNG_MAGIC
    assert "discriminates: no (min margin nan)" in paths["summary"].read_text()
    data = json.loads(paths["json"].read_text(), parse_constant=_reject_constant)
    assert data["margins"][0]["min_margin"] == "nan"


@pytest.mark.parametrize("target,victim", [("_write_csv", "cross_likelihood.csv"),
                                           ("_save_png", "matrices.png")])
def test_write_report_atomic_on_failure(tmp_path, monkeypatch, target, victim):
    old = b"old content that must survive\n"
    (tmp_path / victim).write_bytes(old)

    def fail_half_way(obj, fh):
        fh.write(b"partial" if "b" in fh.mode else "kind,source,partial")
        fh.flush()
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, target, fail_half_way)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(make_results(), tmp_path)
    assert (tmp_path / victim).read_bytes() == old
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".") or p.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self):
        self.calls = []

    def log(self, payload):
        self.calls.append(payload)


def test_log_to_wandb_fake_run(tmp_path):
    import wandb

    results = make_results()
    paths = write_report(results, tmp_path)
    run = FakeRun()
    log_to_wandb(results, run, paths=paths)
    assert len(run.calls) == 1
    payload = run.calls[0]
    p = "cross_likelihood"
    assert set(payload) == {f"{p}/table", f"{p}/matrices", f"{p}/noise_grid",
                            f"{p}/min_margin_sigma_0.0", f"{p}/min_margin_sigma_0.077"}
    table = payload[f"{p}/table"]
    assert isinstance(table, wandb.Table)
    assert list(table.columns) == ["kind", "source", "prior", "sigma_model", "sigma_data", "loglik"]
    assert len(table.data) == EXPECTED_ROWS
    assert isinstance(payload[f"{p}/matrices"], wandb.Image)
    assert payload[f"{p}/min_margin_sigma_0.0"] == 2.0
    assert payload[f"{p}/min_margin_sigma_0.077"] == -4.0

    run = FakeRun()
    log_to_wandb(results, run, prefix="eval")
    assert set(run.calls[0]) == {"eval/table", "eval/min_margin_sigma_0.0", "eval/min_margin_sigma_0.077"}


def test_log_to_wandb_offline(tmp_path, monkeypatch):
    import wandb

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    results = make_results()
    paths = write_report(results, tmp_path / "report")
    run = wandb.init(mode="offline", dir=tmp_path, project="test")
    try:
        log_to_wandb(results, run, paths=paths)
        assert run.summary["cross_likelihood/min_margin_sigma_0.0"] == 2.0
    finally:
        run.finish()
    # wandb stores media as media/<type>/<prefix>/<leaf key>_<step>_<hash>.<ext>
    media = [m.relative_to(tmp_path).as_posix()
             for m in (tmp_path / "wandb").glob("offline-run-*/files/media/**/*") if m.is_file()]
    for leaf in ("matrices_0_", "noise_grid_0_"):
        assert any(f"/cross_likelihood/{leaf}" in m and m.endswith(".png") for m in media), media
    assert any("/cross_likelihood/table_0_" in m and m.endswith(".table.json") for m in media), media
