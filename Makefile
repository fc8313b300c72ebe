# aigw: `make run` (demo) and `make test` (every test) do all set-up on Debian 12.
# Missing Debian packages are installed with apt-get when root; otherwise the one
# `sudo apt-get install ...` line is printed and make stops.

DEPS := meson ninja-build pkg-config gcc libc6-dev libuv1-dev libmbedtls-dev libinih-dev \
        node-llhttp libcmocka-dev libjsmn-dev libyajl-dev python3 openssl curl clang-format \
        libnss-wrapper libsystemd-dev libhiredis-dev redis-server
BENCH_DEPS := wrk haproxy nginx-light
# headless Chromium renders the status page in test_status_page.py (only `make test` needs it)
TEST_DEPS := chromium

BUILD := build
ASAN_BUILD := build-asan
MESON_OPTS := --buildtype=debugoptimized
ASAN_OPTS := --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false

SRC_DIRS := cmd core balancer health shm test/unit test/mock test/fuzz test/bench

.PHONY: all deps bench-deps sdk-deps build asan run test unit integration bench bench-tls bench-cluster \
        bench-streams soak fuzz fmt fmt-check clean

all: build

deps:
	@./test/deps.sh $(DEPS)

bench-deps:
	@./test/deps.sh $(DEPS) $(BENCH_DEPS)

# The official OpenAI Node.js client (test/sdk/package-lock.json) for test_openai_sdk.py: npm ci
# when test/sdk/node_modules is missing or the lock changed. Node.js and npm are the machine's, or
# Debian's nodejs + npm when it has none.
sdk-deps:
	@./test/sdk/install.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) $(MESON_OPTS)

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) $(ASAN_OPTS)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

asan: deps $(ASAN_BUILD)/build.ninja
	ninja -C $(ASAN_BUILD)

run: build
	./test/mock/demo.sh $(BUILD)

# Every test: format check, unit tests and integration tests on the optimised build and again
# on the ASan+UBSan build. Ends with "N passed, N failed". A failed sdk-deps (or chromium
# install) does not stop the run: test_openai_sdk (test_status_page) then fails with the reason.
test: build asan
	-@./test/sdk/install.sh
	-@./test/deps.sh $(TEST_DEPS)
	./test/run.sh $(BUILD) $(ASAN_BUILD)

# aigw, HAProxy and nginx side by side (BENCHMARKS.md). bench-tls: the same with the upstream
# over HTTPS, non-stream and SSE answers. bench-streams: 10,000 SSE streams through 2 workers.
bench: bench-deps build
	./test/bench/bench.sh $(BUILD)

bench-cluster: bench-deps build
	BENCH_CLUSTER=1 ./test/bench/bench.sh $(BUILD)

bench-tls: bench-deps build
	BENCH_TLS=1 BENCH_KINDS="$${BENCH_KINDS:-json sse sse-rec}" ./test/bench/bench.sh $(BUILD)

bench-streams: bench-deps build
	./test/bench/streams.sh $(BUILD)

# Mixed traffic with a backend killed every minute, SOAK_SECONDS long (shorter to try it).
SOAK_SECONDS ?= 600
soak: build
	SOAK_SECONDS=$(SOAK_SECONDS) ./test/bench/soak.py --build $(BUILD)

# Open-ended coverage-guided fuzzing of each target with clang's libFuzzer (FUZZ_SECONDS each).
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS := -std=gnu17 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined -I. \
               -I/usr/share/include/llhttp
fuzz: deps
	./test/deps.sh clang libclang-rt-14-dev
	mkdir -p $(BUILD)/fuzz
	for t in conf body values request; do \
	    clang $(FUZZ_CFLAGS) -o $(BUILD)/fuzz/fuzz_$$t test/fuzz/fuzz_$$t.c \
	        $$(ls core/*.c shm/*.c balancer/*.c health/*.c) /usr/share/llhttp/*.c \
	        $$(pkg-config --cflags --libs libuv inih yajl) -lmbedtls -lmbedx509 -lmbedcrypto -lm \
	        || exit 1; \
	    mkdir -p $(BUILD)/fuzz/corpus-$$t; \
	    $(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
	        $(BUILD)/fuzz/corpus-$$t test/fuzz/corpus/$$t || exit 1; \
	done

fmt:
	find $(SRC_DIRS) -name '*.[ch]' | xargs clang-format -i

fmt-check:
	find $(SRC_DIRS) -name '*.[ch]' | xargs clang-format --dry-run --Werror

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
