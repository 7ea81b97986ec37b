#!/usr/bin/env bash
# Install dependencies, build, run the unit tests (with the fuzz corpora replayed), the
# container test and the end-to-end suite, a short run of every fuzz harness, then the suite
# again under AddressSanitizer, LeakSanitizer and UBSan (scripts/test-asan.sh).
# Exits non-zero if anything fails (including pytest collecting no tests).
set -euo pipefail
cd "$(dirname "$0")/.."

export VIRTMUX_BUILD=${VIRTMUX_BUILD:-$PWD/build}

bash scripts/deps.sh
bash scripts/build.sh

status=0

echo "=== unit tests (meson test) ==="
if ! meson test -C "$VIRTMUX_BUILD" --print-errorlogs; then
    echo "unit tests FAILED"
    status=1
fi

echo "=== container image and sidecar (docker/test-sidecar.sh) ==="
# Builds the image with a private dockerd and runs it next to a private
# libvirtd; VIRTMUX_SKIP_DOCKER=1 leaves it out (the summary says so).
if [[ "${VIRTMUX_SKIP_DOCKER:-0}" == 1 ]]; then
    echo "container tests SKIPPED (VIRTMUX_SKIP_DOCKER=1)"
elif ! bash docker/test-sidecar.sh; then
    echo "container tests FAILED"
    status=1
fi

echo "=== end-to-end tests (pytest) ==="
# /usr/bin/python3 on purpose: the Debian interpreter has the libvirt module,
# a python3 found earlier on PATH may not.
set +e
/usr/bin/python3 -m pytest -v tests/e2e
rc=$?
set -e
case $rc in
    0) ;;
    5) echo "pytest collected no tests: treating as failure"; status=1 ;;
    *) echo "end-to-end tests FAILED (pytest exit $rc)"; status=1 ;;
esac

echo "=== fuzzing, a short bounded run of every harness (scripts/fuzz.sh) ==="
# Replays of the checked-in corpora ran with the unit tests; this explores from them under
# libFuzzer with ASan+UBSan. docs/FUZZING.md says how to run for long.
if ! bash scripts/fuzz.sh "${VIRTMUX_FUZZ_SECONDS:-15}"; then
    echo "fuzz stage FAILED"
    status=1
fi

echo "=== sanitizer stage (scripts/test-asan.sh) ==="
if ! bash scripts/test-asan.sh; then
    echo "sanitizer stage FAILED"
    status=1
fi

exit $status
