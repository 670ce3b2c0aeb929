# Stable entry points: `make demo`, `make test`, `make prepare`, `make pipeline` (outside checks use these names).
#   make demo                                   synthetic data -> whole pipeline -> runs/demo/metrics.json
#   make demo-cold                              the same with 5% cold-start items -> runs/demo_cold/ (+ ablation)
#   make test                                   the test suite
#   make prepare  DATA=<MovieLens folder> RUN=<run folder>
#   make pipeline DATA=<MovieLens folder> RUN=<run folder> [POSTERS=<poster folder>] [PRESET=ml_small|ml25m|demo]
#                 [JOBS=2] trains up to JOBS models at once (SASRec beside the poster features, the two TIGERs
#                 side by side; 1 torch thread each unless THREADS=n); JOBS=1 runs the steps one after another.
#                 PRESET=ml25m defaults to JOBS=1: SASRec alone needs ~20 GB of GPU memory there.
#                 [COLD=0.05] holds that share of the rated items out as cold-start items and ends with their
#                 evaluation (experiments/11_cold_start.py -> RUN/cold/, the `cold` section of RUN/metrics.json)
#   make scale-check [SCALE_WORK=/tmp/scale_check]  every step at ML-25M size, tiny iteration counts (BENCHMARKS.md)
#   make seeds    (same variables) [SEEDS=0,1,2] every model of a finished pipeline run over seeds -> RUN/seeds.md
#   make ablation (same variables) [SETS=...] [SEEDS=...] [ABLATION_OUT=RUN/ablation] feature sets x seeds;
#                 with RQVAE_GIN=configs/rqvae_ml_small_gated.gin ABLATION_OUT=RUN/ablation_gated: adaptive fusion
#   make gallery  RUN=<run> POSTERS=<poster folder>  posters under sampled codes, users' top-10 -> RUN/gallery/
#   TMDB_DETAILS=<details.jsonl> (default DATA/tmdb/details.jsonl): the text block joins the fused features [TEXT=no]
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= dataset/demo
RUN ?= runs/demo
POSTERS ?= $(DATA)/posters
PRESET ?= ml_small
RQVAE_GIN ?= configs/rqvae_$(PRESET).gin
DECODER_GIN ?= configs/decoder_$(PRESET).gin
SASREC_GIN ?= configs/sasrec_$(PRESET).gin
BACKBONE ?= efficientnet_lite0
# 160 px for the CPU preset ml_small: 2.4x faster than 224 px, genre-probe AUC 0.743 vs 0.753 (docs/results/poster_genre_auc.md)
IMAGE_SIZE ?= $(if $(filter ml_small,$(PRESET)),160,224)
BLOCKS ?=
# Order inside timestamp ties: hash (unlearnable, default) or movieid (as in published MovieLens numbers)
TIE_BREAK ?= hash
# Share of the rated items held out as cold-start items (empty: no cold-start split)
COLD ?=
# TMDB details (step 3's details.jsonl): when the file exists step 5 gets it and, unless BLOCKS is given,
# adds the 'text' block to the preset's blocks; when it does not, the text block is left out (and said so)
# TEXT=no leaves the text block out even when the file exists (e.g. to keep an older run's blocks).
TMDB_DETAILS ?= $(DATA)/tmdb/details.jsonl
TEXT ?= auto
HAS_DETAILS := $(if $(filter no,$(TEXT)),,$(if $(wildcard $(TMDB_DETAILS)),yes))
TEXT_FLAGS = $(if $(HAS_DETAILS),--tmdb-details $(TMDB_DETAILS) $(if $(BLOCKS),,--add-blocks text))
ABLATION_OUT ?= $(RUN)/ablation
SEEDS ?= 0,1,2
SETS ?= genres_year,text,poster,all
JOBS ?= $(if $(filter ml25m,$(PRESET)),1,2)
THREADS ?= $(if $(filter 1,$(JOBS)),,1)
THREADS_FLAG = $(if $(THREADS),--threads $(THREADS))

.PHONY: venv test demo prepare features pipeline pipeline-models rqvae tiger tiger-random sasrec seeds ablation \
        posters-check clean-demo scale-check cold demo-cold gallery

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

prepare: venv
	$(PY) experiments/02_prepare_interactions.py --data $(DATA) --run $(RUN) --tie-break $(TIE_BREAK) $(if $(COLD),--cold $(COLD))

# A poster folder is needed unless BLOCKS is given without 'poster'.
comma := ,
NEEDS_POSTERS := $(if $(BLOCKS),$(findstring $(comma)poster$(comma),$(comma)$(BLOCKS)$(comma)),yes)

posters-check:
	@if [ -n "$(NEEDS_POSTERS)" ] && [ ! -d "$(POSTERS)" ]; then \
	  echo "error: no poster folder at $(POSTERS). Download posters (experiments/03_download_posters.py --data $(DATA)),"; \
	  echo "       pass POSTERS=<folder of {movieId}.jpg>, or run without the poster block: BLOCKS=genres,year,tags"; \
	  exit 2; fi

features: prepare posters-check
ifeq ($(NEEDS_POSTERS),)
	@echo "BLOCKS=$(BLOCKS) has no poster block: skipping poster features"
else
	$(PY) experiments/04_extract_poster_features.py --run $(RUN) --posters $(POSTERS) \
	  --backbone $(BACKBONE) --image-size $(IMAGE_SIZE)
endif
	$(if $(HAS_DETAILS),@echo "TMDB details $(TMDB_DETAILS): the text block joins the fused features (TEXT=no to leave it out)",@echo "no text block: $(if $(filter no,$(TEXT)),TEXT=no,no TMDB details at $(TMDB_DETAILS) (TMDB_DETAILS=<details.jsonl>))")
	$(PY) experiments/05_fuse_item_features.py $(RQVAE_GIN) --run $(RUN) --data $(DATA) \
	  --posters-features $(RUN)/poster_features $(if $(BLOCKS),--blocks $(BLOCKS)) $(TEXT_FLAGS)

# The model steps as a dependency graph, run JOBS at a time by `pipeline`:
#   prepare -> features -> rqvae -> tiger, tiger-random;   prepare -> sasrec (+ most-popular)
pipeline: venv posters-check
	$(MAKE) --no-print-directory -j$(JOBS) pipeline-models
	$(if $(COLD),$(PY) experiments/11_cold_start.py --run $(RUN))
	$(PY) experiments/08_report.py --run $(RUN)
	@cat $(RUN)/results.md

pipeline-models: tiger tiger-random sasrec

rqvae: features
	$(PY) train_rqvae.py $(RQVAE_GIN) --run $(RUN)

tiger: rqvae
	$(PY) train_decoder.py $(DECODER_GIN) --run $(RUN) $(THREADS_FLAG)

tiger-random: rqvae
	$(PY) train_decoder.py $(DECODER_GIN) --run $(RUN) $(THREADS_FLAG) --random-ids

# Posters of a finished run: sampled first-level codes, and TIGER's test top-10 for sampled users -> RUN/gallery/
gallery: venv
	$(PY) experiments/12_gallery.py --run $(RUN) --posters $(POSTERS) $(THREADS_FLAG)

# The cold-start evaluation of a finished pipeline run prepared with COLD=...
cold: venv
	$(PY) experiments/11_cold_start.py --run $(RUN)

sasrec: prepare
	$(PY) experiments/07_train_baselines.py --run $(RUN) --sasrec-config $(SASREC_GIN) $(THREADS_FLAG)

# Every model of a finished pipeline run over SEEDS (seed 0 is the run itself): RUN/seeds.{json,md}
seeds: rqvae
	$(PY) experiments/10_seeds.py --run $(RUN) --seeds $(SEEDS) --train --rqvae-config $(RQVAE_GIN) \
	  --decoder-config $(DECODER_GIN) --sasrec-config $(SASREC_GIN) --jobs $(JOBS) $(THREADS_FLAG)

ablation: features
	$(PY) experiments/09_ablation.py --run $(RUN) --data $(DATA) --rqvae-config $(RQVAE_GIN) \
	  --decoder-config $(DECODER_GIN) --sets $(SETS) --seeds $(SEEDS) --jobs $(JOBS) --out $(ABLATION_OUT) \
	  $(if $(HAS_DETAILS),--with-text --tmdb-details $(TMDB_DETAILS))

demo: venv
	$(PY) experiments/00_make_demo_data.py --out dataset/demo
	$(MAKE) --no-print-directory pipeline DATA=dataset/demo RUN=runs/demo PRESET=demo IMAGE_SIZE=128
	$(MAKE) --no-print-directory ablation DATA=dataset/demo RUN=runs/demo PRESET=demo IMAGE_SIZE=128 \
	  SETS=text,all SEEDS=0,1
	$(MAKE) --no-print-directory gallery DATA=dataset/demo RUN=runs/demo

# The cold-start demo: 5% of the demo's items held out as cold; TIGER and Semantic-KNN with and without posters
demo-cold: venv
	$(PY) experiments/00_make_demo_data.py --out dataset/demo
	$(MAKE) --no-print-directory pipeline DATA=dataset/demo RUN=runs/demo_cold PRESET=demo IMAGE_SIZE=128 COLD=0.05
	$(MAKE) --no-print-directory ablation DATA=dataset/demo RUN=runs/demo_cold PRESET=demo IMAGE_SIZE=128 \
	  COLD=0.05 SETS=text,all SEEDS=0,1,2

# Every step at ML-25M size with tiny iteration counts: wall time, peak RSS, projections (bench/scale_check.py)
SCALE_WORK ?= /tmp/scale_check
scale-check: venv
	$(PY) bench/scale_check.py --work $(SCALE_WORK)

clean-demo:
	rm -rf dataset/demo runs/demo
