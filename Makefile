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
# a GPU (nvidia-smi sees one): fp16 graphs for TensorRT; without one, fp32, which ONNX Runtime's CPU provider runs
# several times faster than fp16
HAS_GPU       := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PRECISION     ?= $(if $(HAS_GPU),fp16,fp32)
EXPORT_FLAGS  ?=
BUILD_FLAGS   ?=
PROMPT        ?= a photograph of an astronaut riding a horse
STEPS         ?= 20
BENCH_FLAGS   ?=
# test processes: the CPU suite is mostly single-threaded tracing; one worker per core (modules with costly
# fixtures stay in one worker through their xdist_group mark)
TEST_WORKERS  ?= 2

# the GPU check (benchmarks/GPU.md): wheels a bare GPU machine's image lacks, pinned so every run carries the same
GPU_WHEEL_PINS ?= diffusers==0.42.1 importlib_metadata==10.2.0 torchsde==0.2.6 trampoline==0.1.2
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)
# the rehearsal's Python: 3.12 as on the device (pyenv's where no python3.12 is on the PATH)
GPU_PYTHON    ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -V >/dev/null 2>&1 && echo python3.12 || ls $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
GPU_VENV      ?= .gpu-venv
GPU_OUT       ?= build/gpu-rehearsal

# `sdrt bench --peers`: optimum-intel and OpenVINO GenAI in a venv of their own. optimum-intel 2.2 needs transformers
# < 5.6 (sdrt's is newer) and huggingface-hub < 1.22; diffusers 0.42 imports a Gemma class transformers 5.5 lacks,
# and 0.40-0.41 need huggingface-hub >= 1.23: hence diffusers 0.39 (and hub 1.21's typer < 0.26). optimum-intel goes
# in without its dependencies: torchvision does not import beside this torch build (transformers falls back to PIL).
PEERS_VENV    ?= .peers-venv
PEERS_PINS    ?= transformers==5.5.4 diffusers==0.39.0 huggingface-hub==1.21.0 typer==0.25.1 optimum==2.3.0 \
                 openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0 nncf==3.4.0
PEERS_NODEPS  ?= optimum-intel==2.2.0

.PHONY: help setup engines demo bench test lint clean-engines gpu-wheels gpu-rehearsal cpu-peers

help:
	@echo "make setup     create $(VENV) with torch (TORCH=auto|cpu|cuda|keep) and sdrt[export,test,serve,rtx,samplers,openvino]"
	@echo "make engines   export MODEL (default sd15) to engines/NAME (default MODEL), then build TensorRT plans"
	@echo "make demo      export MODEL, build (GPU only) and generate one image (PROMPT, STEPS) to engines/NAME-demo.png"
	@echo "make bench     make engines, then sdrt bench engines/NAME (BENCH_FLAGS) against eager diffusers -> benchmarks/results/"
	@echo "make cpu-peers $(PEERS_VENV): optimum-intel and OpenVINO GenAI for sdrt bench --peers (pinned versions)"
	@echo "make test      run the test suite (CPU; GPU and TensorRT tests skip without them; TEST_WORKERS processes)"
	@echo "make lint      ruff"
	@echo "make gpu-wheels     .whl/: sdrt's wheel and the pinned wheels a GPU machine's image lacks (benchmarks/GPU.md)"
	@echo "make gpu-rehearsal  benchmarks/gpu_check.sh as a dry run on the CPU, in a venv of the device's versions"

setup: $(VENV)/.setup-done

# torch, then sdrt with the export extra: what `sdrt export` and `sdrt generate` need, all a CPU `make demo` installs
$(VENV)/.export-done: pyproject.toml
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
	$(BIN)/pip install -q -e '.[export]'  # also brings torch's own dependencies
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

# the rest: the server (and Ray), TensorRT for RTX, the test tools, the extra samplers' torchsde and scipy
$(VENV)/.setup-done: $(VENV)/.export-done
	$(BIN)/pip install -q -e '.[export,test,serve,rtx,samplers,openvino]'
	touch $@

# export once (remove engines/NAME or pass EXPORT_FLAGS=--force to redo it); build skips up-to-date plans
engines: setup engines/$(NAME)/manifest.json
	$(BIN)/sdrt build engines/$(NAME) $(BUILD_FLAGS)

engines/$(NAME)/manifest.json:
	$(BIN)/sdrt export $(MODEL) engines/$(NAME) --precision $(PRECISION) $(EXPORT_FLAGS)

# on a GPU: the engines at the model's native size; without one: ONNX Runtime at the smallest exported size, and
# no engine build (its engines are for RTX GPUs: `make engines` builds them)
# without a GPU the demo needs only the export extra (no engine build), which installs in a fraction of the time
demo: $(if $(HAS_GPU),setup,$(VENV)/.export-done) engines/$(NAME)/manifest.json
ifeq ($(HAS_GPU),1)
	$(BIN)/sdrt build engines/$(NAME) $(BUILD_FLAGS)
	$(BIN)/sdrt generate engines/$(NAME) "$(PROMPT)" --steps $(STEPS) --seed 0 --out engines/$(NAME)-demo.png --verbose
else
	@px=$$($(BIN)/python -c "import json; print(json.load(open('engines/$(NAME)/manifest.json'))['shapes']['min_px'])"); \
	echo "demo: no GPU here: $(PRECISION) graphs on ONNX Runtime's CPU provider at $${px}x$${px} px, no engine build"; \
	$(BIN)/sdrt generate engines/$(NAME) "$(PROMPT)" --steps $(STEPS) --seed 0 --height $$px --width $$px \
	  --out engines/$(NAME)-demo.png --verbose
endif

# every available backend (CUDA graph on and off) and diffusers, interleaved; on the CPU use PRECISION=fp32
bench: engines
	$(BIN)/sdrt bench engines/$(NAME) $(BENCH_FLAGS)

cpu-peers: $(PEERS_VENV)/.done

$(PEERS_VENV)/.done: benchmarks/peers-constraints.txt Makefile
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --no-deps --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX)
	$(PEERS_VENV)/bin/pip install -q -c benchmarks/peers-constraints.txt $(PEERS_PINS)
	$(PEERS_VENV)/bin/pip install -q --no-deps $(PEERS_NODEPS)
	$(PEERS_VENV)/bin/python -c "from optimum.intel import OVDiffusionPipeline; import openvino_genai"
	$(PEERS_VENV)/bin/python benchmarks/peer_worker.py --probe
	touch $@

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=20

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# sdrt's own wheel plus the pinned cp312 manylinux wheels the device image lacks; one version of each, under 60 MB
gpu-wheels: setup
	rm -rf .whl build/lib && mkdir -p .whl  # build/lib: setuptools would keep deleted modules in the wheel
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl .
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_PLATFORMS) -d .whl $(GPU_WHEEL_PINS)
	@ls -l .whl; size=$$(du -sm .whl | cut -f1); echo ".whl: $$size MB"; test $$size -lt 60

# the device's Python and package versions (benchmarks/gpu_image.txt), then the check's dry run on the CPU
$(GPU_VENV)/.done: benchmarks/gpu_image.txt
	test -n "$(GPU_PYTHON)" || { echo "no Python 3.12 found: set GPU_PYTHON" >&2; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -r benchmarks/gpu_image.txt
	touch $@

gpu-rehearsal: gpu-wheels $(GPU_VENV)/.done
	rm -rf $(GPU_OUT)
	GPU_CHECK_DRY_RUN=1 OUT=$(GPU_OUT) PYTHON=$(GPU_VENV)/bin/python bash benchmarks/gpu_check.sh

clean-engines:
	find engines -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
