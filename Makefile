# Unsupervised source separation with deep generative priors: every command a researcher runs.
# Variables: PRESET (default | paper, comma-separated extras: ddp, bf16, fp16, debug),
# MODEL (flow | wavenet | score | lqvae: EXPERIMENT=toy_$(MODEL)) or EXPERIMENT (toy_flow, toy_wavenet, toy_score,
# musdb_flow, musdb_wavenet, musdb_score, slakh_flow, slakh_score, *_lqvae; e.g. make cross-likelihood EXPERIMENT=musdb_flow),
# SIGMA, GRID (paper003 | basis), RUNS (output root), ARGS (any config override, key=value ...),
# SOURCES (comma-separated subset to separate), MIX / OUT / FORCE (separating a file),
# DEMO_ROOT / SONGS (make demo-data: output folder, number of songs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= flow
EXPERIMENT ?= toy_$(MODEL)
PRESET ?= default
RUNS ?= runs
GRID ?= paper003
SIGMA ?=
ARGS ?=
SOURCES ?=
MIX ?=
OUT ?=
FORCE ?=
LANGEVIN_ARGS ?=
DATA_ARGS ?=
SCORE_ARGS ?=
POSTERIOR_ARGS ?=
LOCK ?= requirements.lock
DEMO_ROOT ?= data/demo
SONGS ?= 48
SOUNDFONT = $${DEMO_SOUNDFONT:-/usr/share/sounds/sf2/FluidR3_GM.sf2}
# User values reach the recipes as environment variables and are quoted there ("$$MIX"), so a path with
# spaces, quotes or a semicolon is one argument and never shell code. ARGS is split at whitespace only
# (no globbing, no quote removal): each word is one key=value override.
export EXPERIMENT PRESET RUNS GRID SIGMA ARGS SOURCES MIX OUT FORCE AGAINST LANGEVIN_ARGS DATA_ARGS SCORE_ARGS POSTERIOR_ARGS
export DEMO_ROOT SONGS
ABLATION_EXPERIMENT = $(if $(findstring lqvae,$(EXPERIMENT)),$(EXPERIMENT),toy_lqvae)
export ABLATION_EXPERIMENT
SPLIT = read -ra args <<< "$$ARGS";
SEPARATION_SOURCES = $${SOURCES:+"separation.sources=[$$SOURCES]"}
POSTERIOR_SOURCES = $${SOURCES:+"posterior.sources=[$$SOURCES]"}
CLI = $(SPLIT) $(PY) -m experiments.cli
COMMON = "experiment=$$EXPERIMENT" "preset=$$PRESET" "output_root=$$RUNS"

.DEFAULT_GOAL := help
.PHONY: help install lock check-install demo-data test test-slow train-toy-flow train-toy-wavenet train-toy-score train-toy-lqvae train-slakh-lqvae train-musdb-lqvae train-lqvae lqvae-ablation separate-slakh-pairs train-posterior train-pooled separate-variational train-musdb-score train-slakh-score train-musdb-flow train-musdb-wavenet train-slakh-flow compare-toy compare-musdb train finetune-noise finetune-noise-all cross-likelihood separate-toy tune-sampler separation-table separate bench bench-compare gpu-check show-config

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: ## Create .venv from the lock file (exact versions and hashes; ffmpeg/ffprobe and fluidsynth via apt-get when root), then check it
	@if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg; \
	  else \
	    echo "error: ffmpeg/ffprobe not found (musdb needs them). Install them with: sudo apt-get install -y ffmpeg" >&2; exit 1; \
	  fi; \
	fi
	@if ! command -v fluidsynth >/dev/null || [ ! -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fluidsynth fluid-soundfont-gm; } \
	      || echo "note: could not install fluidsynth/fluid-soundfont-gm; only make demo-data needs them" >&2; \
	  else \
	    echo "note: fluidsynth/fluid-soundfont-gm not found; only make demo-data needs them (sudo apt-get install -y fluidsynth fluid-soundfont-gm)" >&2; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m experiments.check_install

check-install: ## pip check and an import of every package the project uses (make install ends with it)
	$(PY) -m experiments.check_install

lock: ## Re-resolve requirements.lock from pyproject.toml (every platform, Python >= 3.10, with hashes); commit it with the change
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.10 --generate-hashes --no-header -o $(LOCK)

demo-data: ## Render a small multitrack set from public-domain scores (music21 corpus, FluidSynth) in both the musdb and Slakh layouts: DEMO_ROOT=data/demo SONGS=48
	@if ! command -v fluidsynth >/dev/null || [ ! -f "$(SOUNDFONT)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fluidsynth fluid-soundfont-gm; \
	  else \
	    echo "error: fluidsynth or the soundfont $(SOUNDFONT) is missing. Install them with: sudo apt-get install -y --no-install-recommends fluidsynth fluid-soundfont-gm" >&2; exit 1; \
	  fi; \
	fi
	$(SPLIT) $(PY) -m experiments.demo_data "root=$$DEMO_ROOT" "songs=$$SONGS" "$${args[@]}"

test: ## Fast test suite (under 10 minutes on 2 CPU cores)
	$(PY) -m pytest -m "not slow" -q

test-slow: ## Slow tests only (kill-and-resume, longer runs)
	$(PY) -m pytest -m slow -q

train-toy-flow: ## Train the four toy FloWaveNet priors (resumes if interrupted)
	$(CLI) train experiment=toy_flow "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-toy-wavenet: ## Train the four toy WaveNet priors (resumes if interrupted)
	$(CLI) train experiment=toy_wavenet "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-toy-score: ## Train the four toy score priors (EDM denoisers, denoising score matching; resumes)
	$(CLI) train experiment=toy_score "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-toy-lqvae: ## Train the toy LQ-VAE (stage 1, with its report), then its per-source Transformers (stage 2); resumes
	$(CLI) train experiment=toy_lqvae "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-slakh-lqvae: ## Both LQ-VAE stages on Slakh2100 drums/bass/guitar/piano (needs SLAKH_ROOT)
	$(CLI) train experiment=slakh_lqvae "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-musdb-lqvae: ## Both LQ-VAE stages on musdb18 stems (needs MUSDB_ROOT)
	$(CLI) train experiment=musdb_lqvae "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-lqvae: ## Stage 1 only (the LQ-VAE and its report) of EXPERIMENT, e.g. ARGS="model.lin_weight=0 run_name=no_lin"
	$(CLI) train-lqvae $(COMMON) "$${args[@]}"

lqvae-ablation: ## Stage 1 again without the linearisation loss (run <run_name>_no_lin) and both reports side by side
	$(CLI) lqvae-ablation "experiment=$$ABLATION_EXPERIMENT" "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

separate-slakh-pairs: ## Paper 002's Slakh2100 pairs (drums/bass, drums/guitar, guitar/bass) with the LQ-VAE latent posterior
	$(SPLIT) for pair in drums,bass drums,guitar guitar,bass; do \
	  $(PY) -m experiments.cli separate experiment=slakh_lqvae "preset=$$PRESET" "output_root=$$RUNS" "separation.sources=[$$pair]" "$${args[@]}" || exit 1; \
	done

train-posterior: ## Amortised posterior q(s|m) (the ELBO, or the sleep phase: posterior.sleep_steps) against EXPERIMENT's frozen priors, from mixtures only (SOURCES=sine,square: a subset; resumes)
	$(CLI) train-posterior $(COMMON) $(POSTERIOR_SOURCES) "$${args[@]}"

separate-variational: ## Train the posterior if needed, then separate EXPERIMENT's test mixtures with it (its mean and samples; SOURCES=...)
	$(CLI) train-posterior $(COMMON) $(POSTERIOR_SOURCES) "$${args[@]}"
	$(CLI) separate $(COMMON) separation.algorithm=variational $(SEPARATION_SOURCES) "$${args[@]}"

train-musdb-score: ## Train score priors on musdb18 stems (needs MUSDB_ROOT; default: 4 songs per split)
	$(CLI) train experiment=musdb_score "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-slakh-score: ## Train score priors on Slakh2100 drums/bass/guitar/piano (needs SLAKH_ROOT)
	$(CLI) train experiment=slakh_score "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-musdb-flow: ## Train FloWaveNet priors on musdb18 stems (needs MUSDB_ROOT; default: 4 songs per split)
	$(CLI) train experiment=musdb_flow "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-musdb-wavenet: ## Train WaveNet priors on musdb18 stems (needs MUSDB_ROOT; default: 4 songs per split)
	$(CLI) train experiment=musdb_wavenet "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train-slakh-flow: ## Train FloWaveNet priors on Slakh2100 drums/bass/guitar/piano (needs SLAKH_ROOT)
	$(CLI) train experiment=slakh_flow "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

compare-toy: ## Flow vs WaveNet cross-likelihood side by side (paper 003 Fig. 3, toy row)
	$(CLI) compare experiment=toy_flow "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

compare-musdb: ## Flow vs WaveNet cross-likelihood side by side (paper 003 Fig. 3, musdb row)
	$(CLI) compare experiment=musdb_flow "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

train: ## Train the priors of EXPERIMENT (or MODEL)
	$(CLI) train $(COMMON) "$${args[@]}"

train-pooled: ## The pooled prior of the discrimination report: one prior of the family on every source, then its noise grid (or SIGMA=)
	$(CLI) train-pooled $(COMMON) $${SIGMA:+"sigma=$$SIGMA"} "$${args[@]}"

finetune-noise: ## Fine-tune the priors on x + N(0, SIGMA^2), e.g. make finetune-noise SIGMA=0.077
	$(CLI) finetune $(COMMON) "sigma=$$SIGMA" "$${args[@]}"

finetune-noise-all: ## Fine-tune every level of GRID (paper003: 5 levels from the noiseless prior; basis: 10 levels, serially, in basis_grid/)
	$(CLI) finetune-all $(COMMON) "finetune.grid=$$GRID" "$${args[@]}"

cross-likelihood: ## Cross-likelihood matrices, noise grid and constant-input table (CSV/JSON/PNG/MD + W&B)
	$(CLI) cross-likelihood $(COMMON) "$${args[@]}"

separate-toy: ## Separate test mixtures with the experiment's algorithm (BASIS by default; MODEL=lqvae: latent); trains (and fine-tunes the BASIS grid) first if needed
	$(CLI) train $(COMMON) $(SEPARATION_SOURCES) "$${args[@]}"
	$(CLI) finetune-all $(COMMON) finetune.grid=basis $(SEPARATION_SOURCES) "$${args[@]}"
	$(CLI) separate $(COMMON) $(SEPARATION_SOURCES) "$${args[@]}"

tune-sampler: ## Choose the diffusion sampler's settings on 32 validation mixtures per set (never the test set): <run>/sampler_search/search.{json,md}
	$(SPLIT) $(PY) -m experiments.tune_sampler "experiment=$$EXPERIMENT" "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

separation-table: ## League table: every trained family and sampler on the first 32 toy test mixtures (CSV/MD/PNG)
	$(SPLIT) $(PY) -m experiments.separation_table "preset=$$PRESET" "output_root=$$RUNS" "$${args[@]}"

separate: ## Separate a file: make separate MIX=song.wav OUT=dir [EXPERIMENT=toy_flow] [FORCE=1]
	$(CLI) separate-file $(COMMON) "mix=$$MIX" "out=$$OUT" "force=$$FORCE" $(SEPARATION_SOURCES) "$${args[@]}"

bench: ## Prior throughput, Langevin steps/s + memory, data loading x real time, score priors: training, ODE likelihood, diffusion s/audio s; variational posterior: step, s/audio s ($(RUNS)/bench*.json)
	$(SPLIT) $(PY) -m experiments.bench.priors "output=$$RUNS/bench.json" "$${args[@]}"
	read -ra args <<< "$$LANGEVIN_ARGS"; $(PY) -m experiments.bench.langevin "output=$$RUNS/bench_langevin.json" "$${args[@]}"
	read -ra args <<< "$$DATA_ARGS"; $(PY) -m experiments.bench.data "output=$$RUNS/bench_data.json" "$${args[@]}"
	read -ra args <<< "$$SCORE_ARGS"; $(PY) -m experiments.bench.score "output=$$RUNS/bench_score.json" "$${args[@]}"
	read -ra args <<< "$$POSTERIOR_ARGS"; $(PY) -m experiments.bench.posterior "output=$$RUNS/bench_posterior.json" "$${args[@]}"

bench-compare: ## This tree against a git revision side by side: make bench-compare AGAINST=<rev> [ARGS="cases=toy_flow:default:train rounds=3"] ($(RUNS)/bench_compare.json)
	$(SPLIT) $(PY) -m experiments.bench.compare "against=$$AGAINST" "output=$$RUNS/bench_compare.json" "$${args[@]}"

gpu-check: ## One prepared run on a GPU: paper presets (bf16, DDP, fp32 ratio), likelihoods, every sampler, compile ($(RUNS)/gpu_check/report.{json,md}); ARGS="tiny=1" on CPU
	$(SPLIT) $(PY) -m experiments.bench.gpu_check "output=$$RUNS/gpu_check" "$${args[@]}"

show-config: ## Print the resolved configuration of EXPERIMENT with PRESET and ARGS
	$(CLI) show-config $(COMMON) "$${args[@]}"
