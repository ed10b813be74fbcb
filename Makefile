# apexctl: `make demo` (train + distill + sample + eval the digits default on CPU), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: on this CPU box pip takes the local CPU wheel; on a GPU box PyPI's default Linux wheel is CUDA.
TORCH ?= torch==2.13.0
RUNS ?= runs

.PHONY: install test demo lint clean

$(BIN)/apexctl: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/apexctl

install: $(BIN)/apexctl

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check apexctl tests bench
	$(BIN)/ruff format --check apexctl tests bench

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/apexctl prepare recipes/digits_teacher.yaml
	HF_HUB_OFFLINE=1 $(BIN)/apexctl distill recipes/digits_teacher.yaml
	HF_HUB_OFFLINE=1 $(BIN)/apexctl distill recipes/digits.yaml
	HF_HUB_OFFLINE=1 $(BIN)/apexctl sample --recipe recipes/digits.yaml --steps 1 --num-images 8 \
		--out $(RUNS)/digits/samples "a handwritten digit seven" "an even digit"
	HF_HUB_OFFLINE=1 $(BIN)/apexctl eval digits --recipe recipes/digits.yaml

clean:
	rm -rf $(RUNS)
