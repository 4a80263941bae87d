# Two commands a fresh machine needs: `make demo` and `make test`. Each creates or updates .venv,
# installs torch first (TORCH_SPEC; a later unpinned request would pull a multi-GB CUDA build), then
# the package with the extras it needs.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check -q
DEMO_DATA  ?= demo_data
DEMO_RUN   ?= runs/demo

.PHONY: venv setup-demo setup-test demo test test-unit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

venv: $(PY)
	$(PIP) install "$(TORCH_SPEC)"

setup-demo: venv
	$(PIP) install -e ".[video]"

setup-test: venv
	$(PIP) install -e ".[video,dev]"

# Generates the synthetic SurgΣ-DB-format data, trains the tiny Qwen2.5-VL on it, evaluates on the
# held-out synthetic videos. The demo's own run folder is recreated each time.
demo: setup-demo
	$(VENV)/bin/surgsigma-train data demo $(DEMO_DATA) --seed 0 > /dev/null
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/surgsigma-train validate recipes/demo.yaml output.dir=$(DEMO_RUN)
	$(VENV)/bin/surgsigma-train train recipes/demo.yaml output.dir=$(DEMO_RUN) eval.after_training=true

test: setup-test
	$(PY) -m pytest

test-unit: setup-test
	$(PY) -m pytest -m "not integration"

clean:
	rm -rf $(VENV) $(DEMO_DATA) runs build *.egg-info
