# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# torch/torchvision pinned to the wheels these machines carry on local disk (CUDA build, runs on CPU too).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_UPDATED := /tmp/.vizapp-apt-updated

.PHONY: run test test-floors debs venv bench report evaluate lint clean

# What the app needs (requirements.txt, as Spaces installs it): `make run`.
$(RUN_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_PINS)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# The app plus the test, benchmark and cluster tools (requirements-dev.txt): `make test` and the other targets.
$(STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

venv: $(STAMP)

# Debian packages: chromium for the browser test, Fashion-MNIST for the bundled model's data tests, a C compiler for
# the CPU attention kernel (vizapp/cpu_rows.c; the app forms the attention with torch where there is none).
debs:
	@need=""; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	{ command -v cc >/dev/null 2>&1 && test -f /usr/include/math.h; } || need="$$need gcc libc6-dev"; \
	test -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz || need="$$need dataset-fashion-mnist"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages:$$need"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$need; \
	fi

run: $(RUN_STAMP)
	$(PY) app.py $(ARGS)

test: $(STAMP) debs lint
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.bench $(ARGS)

report: $(STAMP) debs
	$(PY) -m vizapp.bundled.report $(ARGS)

# Every method on the Fashion-MNIST test set, resumable: the authors' perturbation protocol (chefer2021) with
# vizapp's deletion/insertion curves -> docs/faithfulness.md; the whole-patch variant -> docs/faithfulness-patches.md;
# the LRP-family and gradient methods (Transformer Attribution, AttnLRP, LeGrad) -> docs/faithfulness-lrp.md;
# rollout from layer 0 -> docs/faithfulness-rollout0.md; the chefer2021 jobs in one table -> docs/faithfulness-all.md.
# On a machine with many cores, benchmarks/eval_parallel.sh runs each job over many processes (same numbers).
evaluate: $(STAMP) debs
	$(PY) -m vizapp.evaluate fmnist-test --model bundled --out eval-out/fmnist-test-bundled --markdown docs/faithfulness.md $(ARGS)
	$(PY) -m vizapp.evaluate fmnist-test --model bundled --protocol patches --steps 0 --out eval-out/fmnist-test-bundled-patches --markdown docs/faithfulness-patches.md $(ARGS)
	$(PY) -m vizapp.evaluate fmnist-test --model bundled --methods transformer_attribution,attnlrp,legrad,random --steps 0 --out eval-out/fmnist-test-bundled-lrp --markdown docs/faithfulness-lrp.md $(ARGS)
	$(PY) -m vizapp.evaluate fmnist-test --model bundled --methods rollout --rollout-start-layer 0 --steps 0 --out eval-out/fmnist-test-bundled-rollout0 --markdown docs/faithfulness-rollout0.md $(ARGS)
	$(PY) -m vizapp.evaluate.combine eval-out/fmnist-test-bundled eval-out/fmnist-test-bundled-lrp eval-out/fmnist-test-bundled-rollout0 --markdown docs/faithfulness-all.md

# The suite at the lowest versions the requirements allow (requirements-floors.txt), in its own environment; not run by
# CI: `PYTHON=python3.10 make test-floors` (README, Versions).
FLOORS_VENV ?= .venv-floors
test-floors: debs
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements-floors.txt
	$(FLOORS_VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check vizapp tests benchmarks scripts app.py
	$(VENV)/bin/ruff format --check vizapp tests benchmarks scripts app.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
