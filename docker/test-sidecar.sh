#!/usr/bin/env bash
# The container test: build the virtmux image with a private Docker engine and
# run it as a sidecar next to a private libvirtd, checked with virsh and
# libvirt-python (docker/sidecar_check.py); validate the compose files; run
# the installed virtmux.service under systemd in a container
# (docker/Dockerfile.service-test, docker/service_check.py).
#
#   bash docker/test-sidecar.sh          # as root, from a clean clone
#
# It installs what it needs (scripts/deps.sh build test docker), starts its
# own dockerd (own data, exec root, pid file and unix socket; no bridge, no
# iptables), and stops everything it started on exit, failed or not.
# The engine's data root is kept (VIRTMUX_DOCKER_ROOT, default
# /var/lib/virtmux-test-docker) so the base image (by tag) and the build
# layers are cached between runs. Prints "docker: N passed, M failed" last.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "docker: run as root (it starts dockerd and libvirtd)" >&2
    exit 1
fi

bash scripts/deps.sh build test docker

DATA_ROOT=${VIRTMUX_DOCKER_ROOT:-/var/lib/virtmux-test-docker}
BASE_TAG=virtmux-base:bookworm
IMAGE=virtmux:test
export DOCKER=/usr/bin/docker       # Debian's client, matching its dockerd
TMP=$(mktemp -d /tmp/virtmux-docker.XXXXXX)
export DOCKER_HOST=unix://$TMP/docker.sock
DOCKERD_PID=""
passed=0
failed=0

stop_dockerd() {
    [[ -n "$DOCKERD_PID" ]] || return 0
    # containers this script started, should a check have left one behind
    "$DOCKER" ps -aq --filter label=virtmux-test 2>/dev/null |
        xargs -r "$DOCKER" rm -f >/dev/null 2>&1 || true
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
}

cleanup() {
    trap - EXIT INT TERM
    stop_dockerd
    # dockerd unmounts its own; anything left under our exec root goes too
    awk -v d="$TMP/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check() {   # check NAME CMD...: run CMD, count and report it
    local name=$1
    shift
    if "$@" > "$TMP/check.out" 2>&1; then
        passed=$((passed + 1))
        echo "ok - $name"
    else
        failed=$((failed + 1))
        echo "FAIL - $name"
        tail -30 "$TMP/check.out" | sed 's/^/    /'
    fi
}

# One engine per data root: a second run waits for the first to finish.
mkdir -p "$(dirname "$DATA_ROOT")"
exec 9> "$DATA_ROOT.lock"
if ! flock -w 1200 9; then
    echo "docker: $DATA_ROOT is in use by another run for 20 minutes" >&2
    echo "docker: 0 passed, 1 failed (data root locked)"
    exit 1
fi

start_dockerd() {   # start_dockerd [STORAGE_DRIVER]
    local args=(--data-root "$DATA_ROOT" --exec-root "$TMP/exec"
                --pidfile "$TMP/docker.pid" -H "$DOCKER_HOST"
                --bridge=none --iptables=false --ip-masq=false
                # a system containerd (Debian's docker.io starts one) is shared
                # with the system dockerd: keep our containers apart from its
                --containerd-namespace virtmux-test
                --containerd-plugins-namespace virtmux-test-plugins)
    [[ -z "${1:-}" ]] || args+=(--storage-driver="$1")
    mkdir -p "$DATA_ROOT"
    dockerd "${args[@]}" > "$TMP/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 300); do
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
            wait "$DOCKERD_PID" 2>/dev/null || true
            DOCKERD_PID=""
            return 1
        fi
        if "$DOCKER" version >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    stop_dockerd
    return 1
}

t0=$(date +%s)
echo "=== docker: private dockerd (data root $DATA_ROOT) ==="
if ! start_dockerd; then
    echo "docker: dockerd did not start with its default storage driver:"
    tail -5 "$TMP/dockerd.log"
    echo "docker: retrying with --storage-driver=vfs"
    if ! start_dockerd vfs; then
        tail -20 "$TMP/dockerd.log"
        echo "docker: 0 passed, 1 failed (dockerd does not start here)"
        exit 1
    fi
fi
"$DOCKER" info --format 'docker: engine {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}'

echo "=== docker: base image $BASE_TAG ==="
bash docker/base.sh "$BASE_TAG"

echo "=== docker: build $IMAGE (docker/Dockerfile) ==="
if ! "$DOCKER" build --network host --build-arg BASE="$BASE_TAG" \
        -f docker/Dockerfile -t "$IMAGE" . > "$TMP/build.log" 2>&1; then
    tail -40 "$TMP/build.log"
    echo "docker: 0 passed, 1 failed (image build)"
    exit 1
fi
grep -E '^(Step [0-9]+/[0-9]+ : FROM|Successfully tagged)' "$TMP/build.log" || true
# the previous build's image, untagged by this one
"$DOCKER" image prune -f >/dev/null 2>&1 || true
"$DOCKER" image ls --format 'docker: {{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"

runtime_libraries_only() {
    # the runtime stage has no compiler, no headers, and virtmux resolves
    # every library it links
    ! "$DOCKER" run --rm --entrypoint sh "$IMAGE" -c 'command -v cc || ls /usr/include/event2' &&
        "$DOCKER" run --rm --entrypoint sh "$IMAGE" -c \
            '! ldd /usr/sbin/virtmux | grep "not found" && /usr/sbin/virtmux --version'
}
check "runtime image: no toolchain, every library resolves, --version runs" runtime_libraries_only

compose_valid() {   # compose_valid FILE: docker-compose parses and resolves it
    LIBVIRT_GID=10200 VIRTMUX_IMAGE=$IMAGE docker-compose -f "$1" config -q
}
for f in docker/compose/*.yml; do
    check "docker-compose config $f" compose_valid "$f"
done

run_checks() {   # run_checks SCRIPT IMAGE: its "NAME: N passed, M failed" line counts
    local out rc line p f
    out=$TMP/$(basename "$1").out
    set +e
    /usr/bin/python3 "$1" "$2" | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    line=$(grep -E '^[a-z]+: [0-9]+ passed, [0-9]+ failed' "$out" | tail -1 || true)
    p=0
    f=0
    if [[ -n "$line" ]]; then
        read -r p f <<< "$(sed -E 's/^[a-z]+: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/' <<< "$line")"
    fi
    if [[ $rc -ne 0 && $f -eq 0 ]]; then
        f=1     # it died before its summary
    fi
    passed=$((passed + p))
    failed=$((failed + f))
}

echo "=== docker: sidecar next to libvirtd ==="
run_checks docker/sidecar_check.py "$IMAGE"

echo "=== docker: virtmux.service under systemd (docker/Dockerfile.service-test) ==="
if "$DOCKER" build --network host --build-arg BASE="$BASE_TAG" --target build \
        -f docker/Dockerfile -t virtmux:build . > "$TMP/build-stage.log" 2>&1 &&
   "$DOCKER" build --network host --build-arg BASE="$BASE_TAG" \
        --build-arg BUILD=virtmux:build -f docker/Dockerfile.service-test \
        -t virtmux:service-test . > "$TMP/service-build.log" 2>&1; then
    "$DOCKER" image prune -f >/dev/null 2>&1 || true
    run_checks docker/service_check.py virtmux:service-test
else
    tail -30 "$TMP/build-stage.log" "$TMP/service-build.log" 2>/dev/null
    echo "FAIL - service test image build"
    failed=$((failed + 1))
fi

echo "docker: stage took $(( $(date +%s) - t0 )) s"
echo "docker: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
