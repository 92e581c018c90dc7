# Two entry points for a new user: `make demo` and `make test`. Both build .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a CPU wheel on local disk here; unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,raw,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/privcam demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/privcam bench sensor --out benchmarks/results/sensor.json
	$(BIN)/privcam bench readout --out benchmarks/results/readout.json
	$(BIN)/privcam bench model --out benchmarks/results/model.json
	$(BIN)/privcam bench pipeline --out benchmarks/results/pipeline.json

clean:
	rm -rf $(VENV) demo_out build *.egg-info
