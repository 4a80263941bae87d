# Two commands a fresh machine needs: `make demo` and `make test`. Each creates or updates .venv,
# installs torch first (TORCH_SPEC; a later unpinned request would pull a multi-GB CUDA build), then
# the package with the extras it needs, at the exact versions of the tested set (LOCK, used as pip
# constraints). pyproject.toml keeps compatible ranges; `make test-latest` tries the newest they allow.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK       ?= requirements/lock-cpu.txt
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check -q
DEMO_DATA  ?= demo_data
DEMO_RUN   ?= runs/demo
# test-latest / test-pin build their own environments next to .venv
LATEST_VENV ?= .venv-latest
PIN_VENV    ?= .venv-pin
# test-pin: the tested set with some packages moved (their lock lines dropped, the resolver fills the rest), e.g.
# `make test-pin PIN="transformers==5.17.0 huggingface-hub<2" TESTS=tests/models`
PIN         ?=
TESTS       ?=

.PHONY: venv setup-demo setup-test demo test test-unit test-latest test-pin lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

venv: $(PY)
	$(PIP) install "$(TORCH_SPEC)"

setup-demo: venv
	$(PIP) install -c $(LOCK) -e ".[video]"

setup-test: venv
	$(PIP) install -c $(LOCK) -e ".[video,dev]"

# Generates the synthetic SurgΣ-DB-format data, trains the tiny Qwen2.5-VL on it, evaluates on the
# held-out synthetic videos. The demo's own run folder is recreated each time.
demo: setup-demo
	$(VENV)/bin/surgsigma-train data demo $(DEMO_DATA) --seed 0 > /dev/null
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/surgsigma-train validate recipes/demo.yaml output.dir=$(DEMO_RUN)
	$(VENV)/bin/surgsigma-train train recipes/demo.yaml output.dir=$(DEMO_RUN) eval.after_training=true

test: setup-test
	$(PY) -m surgsigma_train.versions
	SURGSIGMA_LOCK=$(LOCK) $(PY) -m pytest

test-unit: setup-test
	$(PY) -m pytest -m "not integration"

# The suite against the newest versions pyproject.toml's ranges allow (no lock): run it before users do.
test-latest:
	$(MAKE) VENV=$(LATEST_VENV) venv
	$(LATEST_VENV)/bin/python -m pip --disable-pip-version-check -q install --upgrade --upgrade-strategy eager -e ".[video,dev]"
	$(LATEST_VENV)/bin/python -m surgsigma_train.versions
	$(LATEST_VENV)/bin/python -m pytest $(TESTS)

# The tested set with one package at another version (e.g. the lowest a range allows).
test-pin:
	@test -n "$(PIN)" || { echo 'usage: make test-pin PIN="package==version ..." [TESTS=tests/...]'; exit 2; }
	$(MAKE) VENV=$(PIN_VENV) venv
	cp $(LOCK) $(PIN_VENV)/constraints.txt
	for spec in $(foreach spec,$(PIN),'$(spec)'); do name=$$(echo "$$spec" | sed 's/[<>=!~ ].*//; s/[-_.]/[-_.]/g'); \
	  grep -v -i "^$$name==" $(PIN_VENV)/constraints.txt > $(PIN_VENV)/constraints.new; \
	  mv $(PIN_VENV)/constraints.new $(PIN_VENV)/constraints.txt; done
	$(PIN_VENV)/bin/python -m pip --disable-pip-version-check -q install -c $(PIN_VENV)/constraints.txt $(foreach spec,$(PIN),"$(spec)") -e ".[video,dev]"
	$(PIN_VENV)/bin/python -m surgsigma_train.versions
	$(PIN_VENV)/bin/python -m pytest $(TESTS)

# Rewrite LOCK from .venv (after the suite passed there on the versions you mean to lock).
lock:
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip --disable-pip-version-check freeze --exclude-editable \
	  | grep -v -i -E '^(torch|surgsigma[-_]train)=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(PIN_VENV) $(DEMO_DATA) runs build *.egg-info
