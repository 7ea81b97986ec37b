#!/usr/bin/env bash
# The sanitizer stage: build virtmux with AddressSanitizer (LeakSanitizer included) and
# UBSan into build-asan, run the unit tests and then the whole end-to-end suite against it.
# Any sanitizer report fails the run: the unit tests through their exit status, the e2e
# harness by collecting every gateway's report (tests/e2e/conftest.py). Known leaks inside
# libraries are suppressed by scripts/lsan.supp, which the harness passes on (see
# docs/RELIABILITY.md).
# Exits non-zero if anything fails. Expects scripts/deps.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=$PWD/build-asan
# Sanitized code runs a few times slower: the harness stretches its waits by this much.
export VIRTMUX_TIME_SCALE=${VIRTMUX_TIME_SCALE:-3}
# Reports stay here for a look after a failure.
export VIRTMUX_SANITIZER_LOGS=$BUILD_DIR/sanitizer-logs

started=$(date +%s)
status=0

echo "=== sanitizer build (address,undefined) into $BUILD_DIR ==="
opts=(-Db_sanitize=address,undefined -Db_lundef=false)
if [[ -f "$BUILD_DIR/build.ninja" ]]; then
    meson setup --reconfigure "${opts[@]}" "$BUILD_DIR"
else
    meson setup "${opts[@]}" "$BUILD_DIR"
fi
ninja -C "$BUILD_DIR"
rm -rf "$VIRTMUX_SANITIZER_LOGS"

echo "=== sanitizer: unit tests ==="
# tests/unit/meson.build gives sanitized tests their ASAN/UBSAN_OPTIONS
if ! meson test -C "$BUILD_DIR" --print-errorlogs; then
    echo "sanitizer unit tests FAILED"
    status=1
fi

echo "=== sanitizer: end-to-end tests (pytest, time scale $VIRTMUX_TIME_SCALE) ==="
set +e
VIRTMUX_BUILD=$BUILD_DIR /usr/bin/python3 -m pytest -v \
    --timeout=$((150 * VIRTMUX_TIME_SCALE)) tests/e2e
rc=$?
set -e
case $rc in
    0) ;;
    5) echo "pytest collected no tests: treating as failure"; status=1 ;;
    *) echo "sanitizer end-to-end tests FAILED (pytest exit $rc)"; status=1 ;;
esac

elapsed=$(($(date +%s) - started))
if [[ $status -eq 0 ]]; then
    echo "sanitizer stage: OK, no sanitizer report (${elapsed} s)"
else
    echo "sanitizer stage: FAILED (${elapsed} s; reports in $VIRTMUX_SANITIZER_LOGS)"
fi
exit $status
