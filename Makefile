# sdrt — set up, export engines, test.  `make help` lists the targets.
PYTHON        ?= python3
VENV          ?= .venv
BIN           := $(VENV)/bin
# torch build: auto (CUDA build where `nvidia-smi -L` sees a GPU, else the CPU build), cpu, cuda, or keep
TORCH         ?= auto
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
MODEL         ?= sd15
NAME          ?= $(MODEL)
PRECISION     ?= fp16
EXPORT_FLAGS  ?=
BUILD_FLAGS   ?=
PROMPT        ?= a photograph of an astronaut riding a horse
STEPS         ?= 20
BENCH_FLAGS   ?=
# test processes: the CPU suite is mostly single-threaded tracing; one worker per core (modules with costly
# fixtures stay in one worker through their xdist_group mark)
TEST_WORKERS  ?= 2

.PHONY: help setup engines demo bench test lint clean-engines

help:
	@echo "make setup     create $(VENV) with torch (TORCH=auto|cpu|cuda|keep) and sdrt[export,test,serve]"
	@echo "make engines   export MODEL (default sd15) to engines/NAME (default MODEL), then build TensorRT plans"
	@echo "make demo      make engines, then generate one image (PROMPT, STEPS) to engines/NAME-demo.png"
	@echo "make bench     make engines, then sdrt bench engines/NAME (BENCH_FLAGS) against eager diffusers -> benchmarks/results/"
	@echo "make test      run the test suite (CPU; GPU and TensorRT tests skip without them; TEST_WORKERS processes)"
	@echo "make lint      ruff"

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@set -e; mode="$(TORCH)"; \
	if $(BIN)/python -c "import torch" 2>/dev/null && [ "$$mode" = auto ]; then mode=keep; fi; \
	if [ "$$mode" = auto ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi; \
	fi; \
	echo "torch: $$mode"; \
	case "$$mode" in \
	  cpu)  $(BIN)/pip install -q --no-deps --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX) ;; \
	  cuda) $(BIN)/pip install -q "torch==$(TORCH_VERSION)" ;; \
	  keep) ;; \
	  *) echo "TORCH must be auto, cpu, cuda or keep" >&2; exit 2 ;; \
	esac
	$(BIN)/pip install -q -e '.[export,test,serve]'  # also brings torch's own dependencies
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

# export once (remove engines/NAME or pass EXPORT_FLAGS=--force to redo it); build skips up-to-date plans
engines: setup engines/$(NAME)/manifest.json
	$(BIN)/sdrt build engines/$(NAME) $(BUILD_FLAGS)

engines/$(NAME)/manifest.json:
	$(BIN)/sdrt export $(MODEL) engines/$(NAME) --precision $(PRECISION) $(EXPORT_FLAGS)

demo: engines
	$(BIN)/sdrt generate engines/$(NAME) "$(PROMPT)" --steps $(STEPS) --seed 0 --out engines/$(NAME)-demo.png --verbose

# every available backend (CUDA graph on and off) and diffusers, interleaved; on the CPU use PRECISION=fp32
bench: engines
	$(BIN)/sdrt bench engines/$(NAME) $(BENCH_FLAGS)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-engines:
	find engines -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
