# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Everything installs into .venv from requirements*.txt; re-installs when they change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup browser demo test lint format fronts bench fidelity fidelity-here decode-profile ab

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python app.py

# Debian's Chromium for the end-to-end browser test (Playwright drives /usr/bin/chromium)
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# precomputed_fronts/smollm2-hhh from the shipped bundle (long: resumable, see its README)
fronts: setup
	$(BIN)/python -m hoe_core.evaluation.fronts --bundle assets/smollm2-hhh

# bench/results.md: every method at every precision, each precision in a fresh process (~30 min on 2 CPU cores)
bench: setup
	$(BIN)/python -m hoe_core bench --bundle assets/smollm2-hhh --md bench/results.md --json bench/results.json

# bench/fidelity.md: HoE's rewards at bf16 / int8 / nf4 against fp32, answer by answer, on the
# prompts and grid of precomputed_fronts (bf16 and int8 generated here, ~30 min, resumable)
FRONTS := precomputed_fronts/smollm2-hhh
fidelity: setup
	$(BIN)/python -m hoe_core.evaluation.fronts --bundle assets/smollm2-hhh --max-prompts 16 --grid 5 \
	  --max-new-tokens 48 --batch-size 16 --precisions bf16,int8 --methods hoe --out bench/fidelity
	$(BIN)/python -m hoe_core.evaluation.fidelity --front fp32=$(FRONTS)/front-fp32.csv \
	  --front nf4=$(FRONTS)/front-nf4.csv --front bf16=bench/fidelity/front-bf16.csv \
	  --front int8=bench/fidelity/front-int8.csv --md bench/fidelity.md

# the same, every precision decoded on this machine (nf4's numerics depend on the CPU), into
# $(FIDELITY_HERE)/ and $(FIDELITY_HERE).md; bench/fidelity-bf16-cpu was made on a CPU with
# bfloat16 units by `make fidelity-here FIDELITY_HERE=bench/fidelity-bf16-cpu` (~10 min, 2 cores)
FIDELITY_HERE ?= bench/fidelity-this-cpu
fidelity-here: setup
	$(BIN)/python -m hoe_core.evaluation.fronts --bundle assets/smollm2-hhh --max-prompts 16 --grid 5 \
	  --max-new-tokens 48 --batch-size 16 --precisions fp32,nf4,bf16,int8 --methods hoe --out $(FIDELITY_HERE)
	$(BIN)/python -m hoe_core.evaluation.fidelity $(foreach p,fp32 nf4 bf16 int8,--front $(p)=$(FIDELITY_HERE)/front-$(p).csv) \
	  --md $(FIDELITY_HERE).md

# where decode time goes, backbone vs HoE at nf4, sampled by `perf record` (~4 min; needs perf);
# bench/decode_profile.md was made this way with --out bench/decode_profile.md
decode-profile: setup
	PYTHONPATH=. $(BIN)/python bench/decode_profile.py --out bench/decode_profile-this-cpu.md

# the working tree's HoE decode and first token against commit OLD, in one process, arms shuffled
# (~4 min): `make ab OLD=d523eeb PRECISION=nf4`; bench/ab_commits-nf4.md was made this way
PRECISION ?= nf4
ab: setup
	@test -n "$(OLD)" || { echo "usage: make ab OLD=<commit> [PRECISION=nf4|bf16|int8|fp32]"; exit 2; }
	PYTHONPATH=. $(BIN)/python bench/ab_commits.py $(OLD) --precision $(PRECISION) --out bench/ab_commits-this-cpu.md
