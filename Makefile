# optd -- optimizer-as-a-service daemon.
#
#   make / make build   build/optd, build/liboptim.a, build/liboptdclient.a
#   make run            install missing packages, build the daemon alone, start it
#   make test           install missing packages, build, run every test
#   make deps           install the missing Debian packages (root), or print the line
#   make asan           the test suite under ASan+UBSan (objects in build-asan/)
#   make valgrind       the test suite under valgrind
#   make tsan           the concurrency and worker suites and the daemon under TSan (build-tsan/)
#   make faults         the daemon-level fault loops at every N (make test samples them)
#   make fuzz           every libFuzzer target for FUZZ_SECONDS (60) each (build-fuzz/)
#   make bench          every benchmark (bench-kernels, bench-http, bench-sync, bench-engine)
#   make bench-engine   the step engine against same-run floors (bench/ENGINE.md)
#   make soak           mixed load with restarts for SOAK_SECONDS (60): RSS, fds, errors
#   make bench-storage  where large vectors should live (docs/storage.md)
#   make bench-remote   optd.torch.RemoteOptimizer's opt.step() against local torch.optim
#   make bench-observe  step throughput with /metrics scraped and 10 event watchers
#   make bench-travel   rollback/fork vs live steps, backup under load (bench/TRAVEL.md)
#   make bench-shard    a 1e7 Adam step over 3 daemons vs 1 (bench/SHARD.md)
#   make cluster        CLUSTER_NODES (3) daemons behind HAProxy on 127.0.0.1:CLUSTER_PORT (8080)
#   make bench-cluster  3 daemons behind HAProxy vs 1 direct; HAProxy vs nginx (bench/CLUSTER.md)
#   make demo           the optimizer comparison on the digits data set, and the
#                       optimizers' trajectories on Rosenbrock and Beale
#   make wheel          the Python client's wheel: build/python/optd-0.1.0-py3-none-any.whl
#   make install        PREFIX=/usr/local DESTDIR= (headers in include/optd/, pkg-config files)
#   make uninstall      removes what make install put there
#   make clean

BUILD    ?= build
CC       ?= cc
PREFIX   ?= /usr/local
DESTDIR  ?=
OPTFLAGS ?= -O2
SANFLAGS ?=

# Packages a Debian 12 machine needs to build and test optd.
# DEPS_RUN is what `make run` needs to build the daemon alone.
DEPS_RUN   := gcc libc6-dev make pkg-config libmicrohttpd-dev libcjson-dev libsqlite3-dev \
              libcurl4-openssl-dev zlib1g-dev libgnutls28-dev
DEPS_BUILD := $(DEPS_RUN) libcmocka-dev sqlite3 ca-certificates
DEPS_TEST  := curl gnutls-bin python3 python3-numpy python3-torch python3-sklearn python3-venv python3-pip python3-setuptools \
              python3-wheel python3-mypy python3-yaml python3-jsonschema golang-go go-staticcheck nodejs \
              docker-compose prometheus chromium npm haproxy
DEPS_BENCH := wrk nginx-light python3-torch python3-numpy haproxy
DEPS_DEMO  := python3-numpy python3-sklearn python3-matplotlib
DEPS_FUZZ  := clang libclang-rt-14-dev
DEPS_TSAN  := libtsan2

PKGS     := libmicrohttpd libcjson sqlite3 libcurl gnutls
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)

# -std=c11 also keeps GCC from contracting a*b+c into FMA
# (-ffp-contract=off), so kernels round exactly like the reference formulas.
WARN     := -Wall -Wextra -Werror
CFLAGS_COMMON := -std=c11 $(WARN) -g $(OPTFLAGS) $(SANFLAGS) -fno-math-errno \
                 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE -I. -MMD -MP
CFLAGS   ?=
ALL_CFLAGS = $(CFLAGS_COMMON) $(PKG_CFLAGS) $(CFLAGS)
LDLIBS_ALL = $(PKG_LIBS) -lz -lpthread -lm

OPTIM_SRC   := $(wildcard optim/*.c)
STORAGE_SRC := $(wildcard storage/*.c)
API_SRC     := $(wildcard api/*.c)
SERVER_SRC  := $(wildcard server/*.c)
CLIENT_SRC  := $(wildcard clients/c/*.c)
TSUP_SRC    := $(wildcard tests/support/*.c)
TEST_SRC    := $(wildcard tests/test_*.c)
BENCH_SRC   := $(wildcard bench/*.c)

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))

LIBOPTIM   := $(BUILD)/liboptim.a
LIBSTORAGE := $(BUILD)/libstorage.a
LIBAPI     := $(BUILD)/libapi.a
LIBCLIENT  := $(BUILD)/liboptdclient.a
OPTD       := $(BUILD)/optd
TESTS      := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))
BENCHES    := $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_SRC))

.PHONY: all build run test deps deps-run deps-test deps-bench deps-demo deps-fuzz deps-tsan fuzz \
        fuzz-build tsan soak asan valgrind bench bench-kernels bench-http bench-sync bench-storage \
        bench-json bench-observe bench-travel bench-shard bench-remote bench-engine demo install uninstall \
        wheel clean test-unit test-clients
.DEFAULT_GOAL := all

all build: $(OPTD) $(LIBOPTIM) $(LIBCLIENT) $(TESTS) $(BENCHES)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIBOPTIM): $(call obj,$(OPTIM_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^
$(LIBSTORAGE): $(call obj,$(STORAGE_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^
$(LIBAPI): $(call obj,$(API_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^
$(LIBCLIENT): $(call obj,$(CLIENT_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# The dashboard's files (web/), embedded into the daemon by tools/embed.c.
WEB_FILES := web/index.html web/app.js web/app.css web/vendor/uPlot.iife.min.js \
             web/vendor/uPlot.min.css web/vendor/uPlot.LICENSE
$(BUILD)/tools/embed: tools/embed.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(WARN) -O2 -o $@ $<
$(BUILD)/gen/web_assets.c: $(WEB_FILES) $(BUILD)/tools/embed
	@mkdir -p $(dir $@)
	$(BUILD)/tools/embed $@ $(WEB_FILES)
$(BUILD)/obj/gen/web_assets.o: $(BUILD)/gen/web_assets.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

# Dependencies point one way: server -> api -> storage, optim.
$(OPTD): $(call obj,$(SERVER_SRC)) $(BUILD)/obj/gen/web_assets.o $(LIBAPI) $(LIBSTORAGE) $(LIBOPTIM)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS_ALL)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(call obj,$(TSUP_SRC)) $(LIBCLIENT) $(LIBAPI) $(LIBSTORAGE) $(LIBOPTIM)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ -lcmocka $(LDLIBS_ALL)

$(BUILD)/bench/%: $(BUILD)/obj/bench/%.o $(LIBCLIENT) $(LIBOPTIM)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS_ALL)
$(BUILD)/bench/json: $(BUILD)/obj/bench/json.o $(LIBAPI) $(LIBOPTIM)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS_ALL)

# bench/storage measures storage itself too.
$(BUILD)/bench/storage: $(BUILD)/obj/bench/storage.o $(LIBSTORAGE) $(LIBOPTIM)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS_ALL)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)

# ------------------------------------------------------------------ deps
# Installs what is missing with apt-get when root; otherwise prints the line.
# (node and npm are only installed from Debian when not on PATH at all.)
define install_missing
	@missing=""; \
	for p in $(1); do \
	  case $$p in nodejs) command -v node >/dev/null 2>&1 && continue;; \
	             npm) command -v npm >/dev/null 2>&1 && continue;; esac; \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else \
	    echo "optd needs:$$missing"; echo "run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
endef

deps:
	$(call install_missing,$(DEPS_BUILD))
deps-run:
	$(call install_missing,$(DEPS_RUN))
deps-test:
	$(call install_missing,$(DEPS_BUILD) $(DEPS_TEST) $(DEPS_FUZZ))
deps-fuzz:
	$(call install_missing,$(DEPS_BUILD) $(DEPS_FUZZ))
deps-tsan:
	$(call install_missing,$(DEPS_BUILD) $(DEPS_TEST) $(DEPS_TSAN))
deps-bench:
	$(call install_missing,$(DEPS_BUILD) $(DEPS_BENCH))
deps-demo:
	$(call install_missing,$(DEPS_BUILD) $(DEPS_DEMO))

# ------------------------------------------------------------------ python
# The Python client's wheel, built from a copy under $(BUILD) so that the
# source tree gets no build/ or egg-info; offline, with Debian's setuptools.
PY_SRC := $(wildcard clients/python/optd/*.py) clients/python/optd/py.typed \
          clients/python/pyproject.toml clients/python/README.md
WHEEL  := $(BUILD)/python/optd-0.1.0-py3-none-any.whl
wheel: $(WHEEL)
$(WHEEL): $(PY_SRC)
	rm -rf $(BUILD)/python-src && mkdir -p $(BUILD)/python-src/optd $(BUILD)/python
	cp clients/python/pyproject.toml clients/python/README.md $(BUILD)/python-src/
	cp clients/python/optd/*.py clients/python/optd/py.typed $(BUILD)/python-src/optd/
	cd $(BUILD)/python-src && /usr/bin/python3 -m pip wheel --no-deps --no-build-isolation \
	    --no-index -q -w $(abspath $(BUILD)/python) .
	rm -rf $(BUILD)/python-src

# ------------------------------------------------------------------ run
OPTD_PORT ?= 8080
# Builds only the daemon (no tests, no benchmarks), then serves in the
# foreground; the banner says where and what to try next.
run: deps-run
	@$(MAKE) --no-print-directory $(OPTD)
	@mkdir -p var
	@echo "optd: serving http://127.0.0.1:$(OPTD_PORT) (database var/optd.db); Ctrl-C stops it."
	@echo "optd: in a second terminal, try: curl http://127.0.0.1:$(OPTD_PORT)/healthz"
	@echo "optd:   or the walkthrough:      sh clients/shell/walkthrough.sh http://127.0.0.1:$(OPTD_PORT)"
	$(OPTD) --port $(OPTD_PORT) --db var/optd.db

# ------------------------------------------------------------------ test
# Each test binary is a cmocka suite; tests/run.sh runs them all plus the
# client suites and prints one closing line.
test: deps-test
	@$(MAKE) --no-print-directory build fuzz-build
	@OPTD_BUILD=$(BUILD) OPTD_FUZZ_BUILD=$(FUZZ_BUILD) sh tests/run.sh

test-unit: build
	@OPTD_BUILD=$(BUILD) OPTD_ONLY_C=1 sh tests/run.sh

asan:
	@$(MAKE) --no-print-directory BUILD=build-asan OPTFLAGS=-O1 \
	    SANFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" build
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    OPTD_BUILD=build-asan OPTD_ONLY_C=1 sh tests/run.sh

# ThreadSanitizer over the suites that run threads against one daemon; the
# daemon runs the TSan build too (OPTD_BIN) and exits 66 after any report,
# which fails the suite that stopped it.
TSAN_SUITES := test_api_concurrency test_workers test_api_cache test_client_c_shard test_tokens
tsan: deps-tsan
	@$(MAKE) --no-print-directory BUILD=build-tsan OPTFLAGS=-O1 \
	    SANFLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
	    build-tsan/optd $(patsubst %,build-tsan/tests/%,$(TSAN_SUITES))
	@TSAN_OPTIONS="halt_on_error=0 exitcode=66 second_deadlock_stack=1 history_size=4" \
	    OPTD_BUILD=build-tsan OPTD_ONLY="$(TSAN_SUITES)" sh tests/run.sh

# The allocation-failure shim test_faults preloads into the daemon: never
# sanitized (under make asan it passes on to ASan's allocator).
$(BUILD)/tests/failmalloc.so: tests/support/shim/failmalloc.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(WARN) -g -O1 -fno-omit-frame-pointer -fPIC -shared -o $@ $< -ldl
all build: $(BUILD)/tests/failmalloc.so

# The daemon under injected I/O faults and allocation failures at every N
# of its scenarios (tests/test_faults.c; make test samples them; the
# allocation loop alone is ~5,000 runs, about 25 minutes).
.PHONY: faults
faults: build
	OPTD_BIN=$(BUILD)/optd OPTD_FAULT_STRIDE=1 OPTD_FAILMALLOC_STRIDE=1 $(BUILD)/tests/test_faults

valgrind: build
	@OPTD_BUILD=$(BUILD) OPTD_ONLY_C=1 OPTD_VALGRIND=1 sh tests/run.sh

# ------------------------------------------------------------------ fuzz
# libFuzzer targets (tests/fuzz/fuzz_*.c) over api/ and optim/, built with
# clang, ASan and UBSan into build-fuzz/.  Seeds: tests/fuzz/corpus/TARGET/;
# inputs that once crashed: tests/fuzz/regressions/TARGET/ (replayed first).
# make test runs each target for 3 seconds (tests/expected.txt).
FUZZ_BUILD   := build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined \
                -fno-omit-frame-pointer
FUZZ_SRC     := $(wildcard tests/fuzz/fuzz_*.c)
FUZZERS      := $(patsubst tests/fuzz/%.c,$(FUZZ_BUILD)/%,$(FUZZ_SRC))

fuzz-build:
	@$(MAKE) --no-print-directory BUILD=$(FUZZ_BUILD) CC=clang OPTFLAGS=-O1 \
	    SANFLAGS="-fsanitize=fuzzer-no-link $(FUZZ_SAN)" $(FUZZERS)

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(FUZZ_BUILD)/libapi.a $(FUZZ_BUILD)/liboptim.a
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_BUILD)/libapi.a \
	    $(FUZZ_BUILD)/liboptim.a $(LDLIBS_ALL)

fuzz: deps-fuzz fuzz-build
	@OPTD_FUZZ_BUILD=$(FUZZ_BUILD) sh tests/fuzz/run.sh $(FUZZ_SECONDS)

# ------------------------------------------------------------------ bench
bench: bench-kernels bench-http bench-sync bench-engine
bench-kernels: build
	$(BUILD)/bench/kernels
bench-http: deps-bench build
	sh bench/http.sh
bench-sync: build
	$(BUILD)/bench/sync
bench-observe: deps-bench build
	sh bench/observe.sh
bench-engine: deps-bench build
	/usr/bin/python3 bench/engine.py $(BENCH_ENGINE_ARGS)
bench-storage: build
	$(BUILD)/bench/storage $(BUILD)/bench-storage
bench-travel: build
	$(BUILD)/bench/travel --optd $(BUILD)/optd
bench-shard: deps-bench build
	OPTD_BIN=$(BUILD)/optd /usr/bin/python3 bench/shard.py $(BENCH_SHARD_ARGS)
bench-remote: build
	OPTD_BIN=$(BUILD)/optd /usr/bin/python3 bench/remote_torch.py
bench-cluster: deps-bench build
	OPTD_BIN=$(BUILD)/optd /usr/bin/python3 bench/cluster.py

# Daemons behind HAProxy on this machine (deploy/cluster/README.md);
# Ctrl-C stops them all.
CLUSTER_NODES ?= 3
CLUSTER_PORT  ?= 8080
.PHONY: cluster bench-cluster
cluster: deps-run
	@$(MAKE) --no-print-directory $(OPTD)
	@command -v haproxy >/dev/null 2>&1 || $(MAKE) --no-print-directory deps-bench
	sh deploy/cluster/run --nodes $(CLUSTER_NODES) --port $(CLUSTER_PORT) --dir $(BUILD)/cluster --optd $(OPTD)

# A mixed-load soak with restarts: SOAK_SECONDS (60); not part of make test.
SOAK_SECONDS ?= 60
soak: build
	OPTD_BIN=$(BUILD)/optd /usr/bin/python3 bench/soak.py --seconds $(SOAK_SECONDS)
bench-json: build
	$(BUILD)/bench/json

demo: deps-demo build
	/usr/bin/python3 demo/compare.py
	/usr/bin/python3 demo/trajectories.py

# make install: the daemon, the libraries with their headers under
# include/optd/ and pkg-config files (optd-client.pc, optim.pc), the man page
# and the systemd unit.  make uninstall removes exactly those files.
LIBDIR     ?= $(PREFIX)/lib
INCDIR     ?= $(PREFIX)/include
PCDIR      ?= $(LIBDIR)/pkgconfig
OPTD_VERSION := 0.1.0
INSTALLED  := $(PREFIX)/bin/optd $(INCDIR)/optd/optim.h $(INCDIR)/optd/optd_client.h \
              $(LIBDIR)/liboptim.a $(LIBDIR)/liboptdclient.a $(PCDIR)/optim.pc $(PCDIR)/optd-client.pc \
              $(PREFIX)/share/man/man8/optd.8 $(PREFIX)/lib/systemd/system/optd.service

$(BUILD)/pkgconfig/%.pc: clients/c/%.pc.in Makefile
	@mkdir -p $(dir $@)
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCDIR@|$(INCDIR)|' \
	    -e 's|@VERSION@|$(OPTD_VERSION)|' $< > $@

install: $(OPTD) $(LIBOPTIM) $(LIBCLIENT) $(BUILD)/pkgconfig/optim.pc $(BUILD)/pkgconfig/optd-client.pc
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(INCDIR)/optd $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PCDIR)
	install -m 755 $(OPTD) $(DESTDIR)$(PREFIX)/bin/optd
	install -m 644 optim/optim.h clients/c/optd_client.h $(DESTDIR)$(INCDIR)/optd/
	install -m 644 $(LIBOPTIM) $(LIBCLIENT) $(DESTDIR)$(LIBDIR)/
	install -m 644 $(BUILD)/pkgconfig/optim.pc $(BUILD)/pkgconfig/optd-client.pc $(DESTDIR)$(PCDIR)/
	install -d $(DESTDIR)$(PREFIX)/share/man/man8 $(DESTDIR)$(PREFIX)/lib/systemd/system
	install -m 644 docs/optd.8 $(DESTDIR)$(PREFIX)/share/man/man8/optd.8
	sed 's|/usr/local/bin/optd|$(PREFIX)/bin/optd|' docs/optd.service \
	    > $(DESTDIR)$(PREFIX)/lib/systemd/system/optd.service
	chmod 644 $(DESTDIR)$(PREFIX)/lib/systemd/system/optd.service

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	-rmdir $(DESTDIR)$(INCDIR)/optd 2>/dev/null

clean:
	rm -rf build build-asan build-fuzz build-tsan
.SECONDARY:
