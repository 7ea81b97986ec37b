#!/usr/bin/env bash
# Build the fuzz harnesses for libFuzzer (clang, ASan + UBSan) and run each one for a while.
#
#   bash scripts/fuzz.sh                 # every harness, 60 s each
#   bash scripts/fuzz.sh 300 fuzz_session fuzz_upstream
#
# Each harness starts from its checked-in corpus (tests/fuzz/corpus/<harness>, read only) and
# keeps what it learns in $FUZZ_WORK/<harness> (default build-fuzz/work). A crash stops that
# harness and leaves crash-* / leak-* / timeout-* files in $FUZZ_WORK/<harness>/artifacts;
# copy a fixed one into the corpus so `meson test` (replay, any compiler) keeps checking it.
# Exit status: non-zero when any harness found something.
#
# Environment: VIRTMUX_FUZZ_BUILD (default ./build-fuzz), FUZZ_WORK, FUZZ_JOBS (parallel
# workers per harness, default 1: the machine is shared).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-60}
shift || true
BUILD_DIR=${VIRTMUX_FUZZ_BUILD:-build-fuzz}
WORK=${FUZZ_WORK:-$BUILD_DIR/work}
JOBS=${FUZZ_JOBS:-1}

bash scripts/deps.sh
if [[ ! -f "$BUILD_DIR/build.ninja" ]]; then
    CC=clang meson setup "$BUILD_DIR" -Dfuzz=true -Db_sanitize=address,undefined \
        -Db_lundef=false -Dbuildtype=debugoptimized
fi
ninja -C "$BUILD_DIR"

if [[ $# -gt 0 ]]; then
    harnesses=("$@")
else
    mapfile -t harnesses < <(cd tests/fuzz && ls fuzz_*.c | sed 's/\.c$//')
fi

# Abort on the first UBSan report too, with a stack, so that it counts as a finding.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0}

status=0
total=0
found=0
for h in "${harnesses[@]}"; do
    exe="$BUILD_DIR/tests/fuzz/$h"
    if [[ ! -x "$exe" ]]; then
        echo "fuzz: no harness $h" >&2
        status=1
        continue
    fi
    mkdir -p "$WORK/$h/corpus" "$WORK/$h/artifacts"
    echo "=== $h: ${SECONDS_EACH}s"
    set +e
    parallel=()
    [[ "$JOBS" -gt 1 ]] && parallel=(-jobs="$JOBS" -workers="$JOBS")
    dict=()
    [[ -f "tests/fuzz/$h.dict" ]] && dict=(-dict="tests/fuzz/$h.dict")
    "$exe" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        "${parallel[@]}" "${dict[@]}" -print_final_stats=1 \
        -artifact_prefix="$WORK/$h/artifacts/" \
        "$WORK/$h/corpus" "tests/fuzz/corpus/$h" > "$WORK/$h/log" 2>&1
    rc=$?
    set -e
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)|cov: .*corp" "$WORK/$h/log" | tail -3
    execs=$(grep -E "^stat::number_of_executed_units" "$WORK/$h/log" | awk '{s += $2} END {print s + 0}')
    echo "fuzz-result: $h execs=$execs seconds=$SECONDS_EACH exit=$rc"
    total=$((total + execs))
    [[ $rc -ne 0 ]] && found=$((found + 1))
    if [[ $rc -ne 0 ]]; then
        echo "fuzz: $h FOUND SOMETHING (exit $rc); see $WORK/$h/log and $WORK/$h/artifacts/"
        grep -m5 -E "ERROR: |runtime error|fuzz_[a-z]+: " "$WORK/$h/log" || true
        status=1
    fi
done
echo "fuzz: ${#harnesses[@]} harnesses, $total executions, $found with findings"
exit $status
