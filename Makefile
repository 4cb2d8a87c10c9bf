# darknet-kfac top-level build.
#
# The K-FAC library (darknet_kfac/) builds and is tested on its own against
# OpenBLAS + LAPACKE. Upstream Darknet is obtained by the build (Debian source
# package `darknet`, pristine, or DARKNET_SRC=path), patched with patches/*.patch
# in order, and built under build/ with the plugin linked in.
#
#   make test            library + Darknet glue tests (installs what it needs)
#   make test SANITIZE=1 the same under ASan/UBSan
#   make demo            K-FAC vs SGD on Fashion-MNIST: CSV, plot, table
#   make compare CFG=f   the same for any classifier cfg, reduced to Fashion-MNIST
#                        [ITERS=2000] [EVAL=ITERS/20] [SEED=1] (docs/compare.md)
#   make bench           side-by-side speed/memory ratios
#   make darknet         just the patched darknet binary (build/darknet/darknet)

SHELL     := /bin/bash
CC        ?= cc
SANITIZE  ?= 0
BLAS      ?= 1
GPU       ?= 0
BUILD     := build

DEPS_LIB     := libopenblas-dev liblapacke-dev libcmocka-dev
DEPS_DARKNET := dpkg-dev xz-utils patch
DEPS_DEMO    := dataset-fashion-mnist gnuplot-nox zlib1g-dev

ifeq ($(SANITIZE),1)
  OUT      := $(BUILD)/san
  SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
  OUT      := $(BUILD)/rel
  SANFLAGS :=
endif

CFLAGS_KFAC := -std=gnu99 -O2 -g -Wall -Wextra -Wno-unused-parameter -fPIC $(SANFLAGS) -Idarknet_kfac
LDLIBS_KFAC := -llapacke -lopenblas -lm

# The library is every darknet_kfac/*.c but the Darknet glue (kfac_darknet*.c)
# and the `darknet kfac` command (kfac_cli.c), which need Darknet's headers.
LIB_SRC  := $(filter-out darknet_kfac/kfac_darknet% darknet_kfac/kfac_cli.c,$(wildcard darknet_kfac/*.c))
LIB_OBJ  := $(patsubst darknet_kfac/%.c,$(OUT)/lib/%.o,$(LIB_SRC))
LIB_HDR  := $(wildcard darknet_kfac/*.h)

# Library tests: every tests/test_*.c except the Darknet glue ones links with
# the library and the shared helpers in tests/ (naive references, tolerances).
TEST_HELPERS := $(filter-out tests/test_%.c,$(wildcard tests/*.c))
LIB_TESTS    := $(filter-out tests/test_darknet%.c,$(wildcard tests/test_*.c))
LIB_TEST_BIN := $(patsubst tests/%.c,$(OUT)/tests/%,$(LIB_TESTS))

# Darknet
DN_SRC := $(BUILD)/darknet-src
# The sanitized and CUDA builds get their own trees: Darknet's Makefile would
# otherwise mix objects built with different flags.
ifeq ($(SANITIZE),1)
  DN   := $(BUILD)/darknet-san
else ifeq ($(GPU),1)
  DN   := $(BUILD)/darknet-gpu
else
  DN   := $(BUILD)/darknet
endif
DN_TESTS    := $(wildcard tests/test_darknet*.c)
# The sanitized suite gets a sanitized copy (its bad-data-file tests run it).
DEMO_BIN := $(if $(filter 1,$(SANITIZE)),$(OUT)/kfac_demo,$(BUILD)/kfac_demo)
DN_TEST_BIN := $(patsubst tests/%.c,$(OUT)/dntests/%,$(DN_TESTS))

.PHONY: all deps lib test test-lib test-darknet darknet gpu-build-check demo compare zoo-retrain bench clean distclean

all: lib

deps:
	@scripts/deps.sh $(DEPS_LIB)

$(OUT)/lib/%.o: darknet_kfac/%.c $(LIB_HDR) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_KFAC) -c $< -o $@

$(OUT)/libkfac.a: $(LIB_OBJ)
	ar rcs $@ $^

# The tests link a copy built with -DUNIT_TESTING, which routes the library's
# allocations through cmocka's test_malloc/test_free so leaks fail the test.
LIBT_OBJ := $(patsubst darknet_kfac/%.c,$(OUT)/libt/%.o,$(LIB_SRC))
$(OUT)/libt/%.o: darknet_kfac/%.c $(LIB_HDR) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_KFAC) -DUNIT_TESTING -c $< -o $@

$(OUT)/libkfac_test.a: $(LIBT_OBJ)
	ar rcs $@ $^

lib: $(OUT)/libkfac.a

$(OUT)/tests/%: tests/%.c $(TEST_HELPERS) $(wildcard tests/*.h) $(OUT)/libkfac_test.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_KFAC) -Itests $< $(TEST_HELPERS) $(OUT)/libkfac_test.a -lcmocka $(LDLIBS_KFAC) -o $@

test-lib: $(LIB_TEST_BIN)
	@scripts/run-tests.sh $(LIB_TEST_BIN)

# ------------------------------------------------------------------ Darknet
$(DN_SRC)/.stamp: scripts/fetch-darknet.sh
	@scripts/deps.sh $(DEPS_DARKNET)
	scripts/fetch-darknet.sh $(DN_SRC)
	@touch $@

$(DN)/.patched: $(DN_SRC)/.stamp $(wildcard patches/*.patch)
	rm -rf $(DN) && cp -a $(DN_SRC) $(DN) && rm -f $(DN)/.stamp
	@set -e; for p in $(sort $(wildcard patches/*.patch)); do \
	  echo "applying $$p"; \
	  patch -p1 --forward --batch --quiet -d $(DN) < $$p || { echo "error: $$p does not apply to upstream Darknet 61c9d02e" >&2; exit 1; }; \
	done
	@touch $@

DN_MAKEFLAGS := KFAC_DIR=$(abspath darknet_kfac) BLAS=$(BLAS) GPU=$(GPU) SANITIZE=$(SANITIZE)

darknet: $(DN)/.patched deps
	$(MAKE) -C $(DN) $(DN_MAKEFLAGS) -j2

$(OUT)/dntests/%: tests/%.c $(TEST_HELPERS) $(wildcard tests/*.h) darknet
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_KFAC) -I$(DN)/include -I$(DN)/src -Itests $< $(TEST_HELPERS) $(DN)/libdarknet.a \
	  -lcmocka $(LDLIBS_KFAC) -lpthread -o $@

test-darknet: $(DN_TEST_BIN) $(DEMO_BIN)
	@scripts/run-tests.sh $(DN_TEST_BIN)

test: deps
	@mkdir -p $(BUILD)
	@$(MAKE) --no-print-directory test-lib test-darknet SANITIZE=$(SANITIZE) 2>&1 | tee $(BUILD)/test.log; \
	  st=$${PIPESTATUS[0]}; scripts/summarize-tests.sh $(BUILD)/test.log; exit $$st

# The CUDA build must keep compiling even where there is no GPU to run it
# (upstream's GPU binary allocates device memory while parsing a cfg, so on a
# machine without a GPU only the build can be checked). Skipped without nvcc.
gpu-build-check:
	@if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then \
	  PATH="$$PATH:/usr/local/cuda/bin" $(MAKE) --no-print-directory darknet GPU=1 >$(BUILD)/gpu-build.log 2>&1 \
	    && echo "GPU=1 build: ok ($(BUILD)/darknet-gpu/darknet)" \
	    || { tail -20 $(BUILD)/gpu-build.log; echo "GPU=1 build: FAILED (see $(BUILD)/gpu-build.log)"; exit 1; }; \
	else echo "GPU=1 build: skipped (no nvcc)"; fi

# ------------------------------------------------------------------ demo/bench
# demo program: reads the Fashion-MNIST IDX files (zlib) into Darknet and
# logs accuracy vs iterations/seconds; relinked whenever darknet is remade.
# demo program binary (DEMO_BIN above)
$(DEMO_BIN): darknet_kfac/demo/kfac_demo.c darknet
	@scripts/deps.sh zlib1g-dev
	$(CC) -std=gnu99 -O2 -g -Wall -Wextra -Wno-unused-parameter $(SANFLAGS) darknet_kfac/demo/kfac_demo.c -o $@ \
	  -I$(DN)/include -I$(DN)/src -Idarknet_kfac $(DN)/libdarknet.a -llapacke -lopenblas -lm -lpthread -lz

demo: darknet
	@scripts/deps.sh $(DEPS_DEMO)
	scripts/demo.sh

compare: darknet
	@[ -n "$(CFG)" ] || { echo "usage: make compare CFG=path [ITERS=N] [EVAL=E] [SEED=S]" >&2; exit 2; }
	@scripts/deps.sh $(DEPS_DEMO)
	scripts/compare.sh "$(CFG)" "$(ITERS)" "$(EVAL)" "$(SEED)"

zoo-retrain: darknet
	@scripts/deps.sh $(DEPS_DEMO)
	scripts/zoo-retrain.sh

bench: darknet lib
	@scripts/deps.sh $(DEPS_DEMO)
	scripts/bench.sh

clean:
	rm -rf $(BUILD)/rel $(BUILD)/san
	-[ -d $(DN) ] && $(MAKE) -C $(DN) clean

distclean:
	rm -rf $(BUILD)
