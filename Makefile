# fedfinn — make targets. `make quick` sets everything up and runs the main
# job; `make test` runs the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfinn-installed

.PHONY: install quick test bench bench-messages reduced clean-runs help

help:
	@echo "make quick     install into $(VENV) and run the small federated job on real CIFAR-10"
	@echo "make test      install and run the test suite"
	@echo "make bench     overhead benchmark (reduced scale, ~15 min on 2 cores)"
	@echo "make bench-messages  model -> message and update compression speed vs the old code"
	@echo "make study-small  every poster row + beyond, small scale (< 2 h on 2 cores) -> results/study-small"
	@echo "make study-medium the poster's regime: full data, 40 rounds (~10 h on 2 cores; resumable) -> results/study-medium"
	@echo "make study-paper  the same at paper scale (GPU-sized) -> results/study-paper"

# torch is pinned in pyproject.toml to the CPU build; a user with a GPU
# installs their own torch into the venv first.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: four of the poster's techniques at a tiny scale on the real
# CIFAR-10 (configs/quick.toml), then the poster's table for them. Two rows run
# at once, each with one single-thread client worker: while one row starts up
# or evaluates its last round, the other trains (measured on 2 cores: 0.8x the
# wall time of one row at a time with two workers, the same results;
# bench/quick_job.py, results/bench/quick_job.json).
QUICK_ROWS := fp32 q8 q4 prune90
QUICK_SET_fp32 := compression.entropy_coding=false
QUICK_SET_q8 := compression.weight_bits=8
QUICK_SET_q4 := compression.weight_bits=4
QUICK_SET_prune90 := compression.prune_rate=0.9
quick: install
	@$(MAKE) --no-print-directory -j2 $(QUICK_ROWS:%=quick-row-%)
	$(BIN)/fedfinn report $(QUICK_ROWS:%=runs/quick_%) --out results/quick

quick-row-%: install
	@$(BIN)/fedfinn run configs/quick.toml --overwrite --quiet --set run.name=quick_$* --set $(QUICK_SET_$*) \
	  --set federation.parallel_clients=1 > /dev/null  # --quiet: two progress bars would overwrite each other
	@echo "quick_$* done"

test: install install-hw install-rtl
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/overhead.py --out results/bench/overhead.json

bench-messages: install
	$(BIN)/python bench/message_speed.py --out results/bench/message_speed

clean-runs:
	rm -rf runs

# --- hardware (hw/) ---
# FINN (finn-plus 1.6.1) hardware flow; see docs/hardware.md.
#   make install-hw                                  finn-plus into $(VENV)
#   make hw MODEL=model.onnx BOARD=Pynq-Z2 [NAME=..] [FPS=..]   -> build/<NAME>
#   make hw-weights BUILD=build/<NAME> MODEL=round.onnx          -> <BUILD>/rounds/<stem>
#   make hw-emulate BUILD=build/<NAME> [N=100] [WEIGHTS=dir]
#   make bitstream BUILD=build/<NAME>                (needs Vivado + Vitis HLS 2024.2)
# finn-plus pins brevitas==0.13.0 (broken on torch 2.13), so its requirements
# are installed explicitly from hw/requirements-finn.txt, then finn-plus itself
# with --no-deps. HW_DEPS= (empty) skips the install check.
HW_STAMP := $(VENV)/.fedfinn-hw-installed
HW_DEPS ?= install-hw
BOARD ?= Pynq-Z2
NAME ?= $(basename $(notdir $(MODEL)))
BUILD ?= build/$(NAME)
N ?= 100
HW_PY := $(BIN)/fedfinn hw

$(HW_STAMP): $(STAMP) hw/requirements-finn.txt
	$(BIN)/python -m pip install -q -r hw/requirements-finn.txt
	$(BIN)/python -m pip install -q --no-deps finn-plus==1.6.1
	$(BIN)/python -c "import export.finn_env as e; e.prepare(); import finn.builder.build_dataflow"
	touch $(HW_STAMP)

install-hw: $(HW_STAMP)

hw: $(HW_DEPS)
	@test -n "$(MODEL)" || { echo "usage: make hw MODEL=<qonnx .onnx> [BOARD=Pynq-Z2] [NAME=..] [FPS=..]"; exit 2; }
	$(HW_PY) build $(MODEL) --board $(BOARD) --out $(BUILD) $(if $(FPS),--target-fps $(FPS))

hw-weights: $(HW_DEPS)
	@test -n "$(MODEL)" || { echo "usage: make hw-weights BUILD=build/<name> MODEL=<round .onnx>"; exit 2; }
	$(HW_PY) weights $(BUILD) $(MODEL)

hw-emulate: $(HW_DEPS)
	$(HW_PY) emulate $(BUILD) -n $(N) $(if $(WEIGHTS),--weights $(WEIGHTS))

bitstream: $(HW_DEPS)
	$(HW_PY) bitstream $(BUILD)

.PHONY: install-hw hw hw-weights hw-emulate bitstream

# --- RTL checks with open tools (hw/rtl_check.py, hw/rtl_sim.py; docs/hardware.md (RTL checks)) ---
#   make install-rtl                   Verilator + g++ + make from apt (Debian 12: Verilator 5.006)
#   make rtl-lint BUILD=build/<NAME>   Verilator lint of every RTL module of a build -> <BUILD>/report/rtl_lint.json
# install-rtl needs root for apt-get; without it, it says what to install and tests/test_rtl.py skips.
RTL_APT := verilator g++ make
install-rtl:
	@if command -v verilator >/dev/null && command -v g++ >/dev/null && command -v make >/dev/null; then \
	  verilator --version; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(RTL_APT) \
	  && verilator --version; \
	else \
	  echo "install-rtl: Verilator not found and apt-get needs root here: sudo apt-get install $(RTL_APT)"; \
	  echo "install-rtl: until then tests/test_rtl.py skips"; \
	fi

rtl-lint: $(HW_DEPS) install-rtl
	@test -n "$(BUILD)" && test -d "$(BUILD)" || { echo "usage: make rtl-lint BUILD=build/<name> (a make hw build)"; exit 2; }
	$(BIN)/python -m hw.rtl_check $(BUILD)

.PHONY: install-rtl rtl-lint

# The reduced-scale rows of the poster (full real CIFAR-10, 10 clients, 4 per
# round, 1 local epoch, 5 rounds): ~7 min per row on 2 cores; finished rows
# are skipped, so it can be stopped and restarted.
REDUCED_ROWS ?= baseline q8bit q4bit q1bit prune50 prune90
reduced: install
	for row in $(REDUCED_ROWS); do $(BIN)/fedfinn run configs/reduced/$$row.toml --skip-done --quiet || exit 1; done
	$(BIN)/fedfinn report $(addprefix runs/reduced_,$(REDUCED_ROWS)) --out results/reduced

# --- the study: the poster's table measured, and beyond it ---
# study-small: every row of the poster's CIFAR-10 table, plus pruning+quantization and heterogeneous
# clients, at a scale that runs in < 2 h on 2 cores (configs/study/small/: 1,000 images per client,
# 15 rounds, 5,000 test images). One command per configuration (each skipped when finished, resumed
# when started: stop it any time and run it again), then one report into results/study-small/.
# study-paper: the same rows at paper scale (100 rounds, full data, 1 and 10 local epochs; GPU-sized).
STUDY_SMALL := $(sort $(basename $(notdir $(wildcard configs/study/small/*.toml))))
STUDY_PAPER_DIRS ?= cifar10_e1 cifar10_e10
study-small: install
	for row in $(STUDY_SMALL); do $(BIN)/fedfinn run configs/study/small/$$row.toml --continue --quiet || exit 1; done
	$(BIN)/fedfinn study $(addprefix runs/study_small_,$(STUDY_SMALL)) --out results/study-small \
	  --title "study-small"

study-paper: install
	for d in $(STUDY_PAPER_DIRS); do for f in configs/paper/$$d/*.toml configs/paper/$${d}_beyond/*.toml; do \
	  $(BIN)/fedfinn run $$f --continue --quiet || exit 1; done; \
	  $(BIN)/fedfinn study runs/paper_$${d}_* --out results/study-paper/$$d --title "study-paper $$d"; done

# study-medium: the poster's regime on the full data (10 x 5,000 images, 4 per round, 40 rounds, 10,000 test
# images), ~25-60 min per row on 2 cores; rows in the order of configs/study/medium/ORDER. Each row is
# skipped when finished and resumed from its last checkpoint when started, and its run folder lives in
# results/study-medium/runs (committed), so the study continues on any machine with this one command.
# --drop-spare-state: an update-mode row keeps only the resume state it needs (~90 MB: ten copies of the
# model), a finished row none.
STUDY_MEDIUM = $(shell cat configs/study/medium/ORDER)
study-medium: install
	for row in $(STUDY_MEDIUM); do $(BIN)/fedfinn run configs/study/medium/$$row.toml --continue --quiet \
	  --drop-spare-state || exit 1; done
	$(MAKE) study-medium-report

study-medium-report: install
	$(BIN)/fedfinn study $(wildcard $(addprefix results/study-medium/runs/study_medium_,$(STUDY_MEDIUM))) \
	  --out results/study-medium --title "study-medium"

.PHONY: study-small study-paper study-medium study-medium-report

# --- deployment: a Flower SuperLink + SuperNodes on this machine ---
# A Flower deployment on this machine: a SuperLink and NODES SuperNodes on
# loopback ports the OS picks, TLS + SuperNode authentication, the ServerApp
# run through them (training/deploy.py; logs in runs/<name>/deploy/).
#   make certs [CERTS=build/certs] [NODES=4] [HOSTS="10.0.0.1 link.example"]
#        CA, SuperLink certificate (localhost + HOSTS), NODES SuperNode key pairs
#   make federation [CONFIG=configs/quick.toml] [NODES=4] [FED_NAME=federation] [FED_ARGS=...]
#        uses $(CERTS) when it holds certificates, else makes fresh ones in the run folder
CERTS ?= build/certs
NODES ?= 4
HOSTS ?=
CONFIG ?= configs/quick.toml
FED_NAME ?= federation
FED_ARGS ?= --set federation.fraction_train=1.0

certs: install
	$(BIN)/python -m training.certs --out $(CERTS) --nodes $(NODES) $(foreach h,$(HOSTS),--host $(h))

federation: install
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/fedfinn deploy $(CONFIG) --nodes $(NODES) \
	  --overwrite --set run.name=$(FED_NAME) $(if $(wildcard $(CERTS)/ca.crt),--certs $(CERTS)) $(FED_ARGS)

.PHONY: certs federation
