#!/usr/bin/env bash
# Quick start: build virtmux, start a private libvirtd serving the built-in
# test driver, and run virtmux in the foreground in front of it.
#
#   bash scripts/demo.sh            # then, in another terminal:
#   virsh -c test+tcp://127.0.0.1/default list
#
# Ctrl-C (or SIGTERM) stops virtmux and the private libvirtd and removes the
# temporary directory. Must run as root (libvirtd does).
#
# Environment: VIRTMUX_DEMO_PORT (default 16509, the port virsh uses when a
# tcp URI names none), VIRTMUX_BUILD (default ./build).
set -euo pipefail
cd "$(dirname "$0")/.."

GW_PORT=${VIRTMUX_DEMO_PORT:-16509}
BUILD_DIR=${VIRTMUX_BUILD:-$PWD/build}
LIBVIRTD=${VIRTMUX_LIBVIRTD:-/usr/sbin/libvirtd}

if [[ $(id -u) -ne 0 ]]; then
    echo "demo: run as root (it starts a private libvirtd)" >&2
    exit 1
fi

bash scripts/deps.sh
VIRTMUX_BUILD=$BUILD_DIR bash scripts/build.sh

port_free() {
    /usr/bin/python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

any_free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if ! port_free "$GW_PORT"; then
    echo "demo: 127.0.0.1:$GW_PORT is in use (a system libvirtd?);" \
         "set VIRTMUX_DEMO_PORT to another port" >&2
    exit 1
fi

if port_free 16600; then
    LV_PORT=16600
else
    LV_PORT=$(any_free_port)
fi

TMP=$(mktemp -d /tmp/virtmux-demo.XXXXXX)
mkdir -p "$TMP/run" "$TMP/drivers"
LV_PID=""
GW_PID=""

cleanup() {
    trap - EXIT INT TERM
    if [[ -n "$GW_PID" ]] && kill -0 "$GW_PID" 2>/dev/null; then
        kill -TERM "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" 2>/dev/null || true
    fi
    if [[ -n "$LV_PID" ]] && kill -0 "$LV_PID" 2>/dev/null; then
        kill -TERM "$LV_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$LV_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$LV_PID" 2>/dev/null || true
        wait "$LV_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
    echo "demo: stopped, removed $TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat > "$TMP/libvirtd.conf" <<EOF
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "$LV_PORT"
auth_tcp = "none"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_dir = "$TMP/run"
log_outputs = "3:file:$TMP/libvirtd.log"
EOF

# An empty driver directory keeps the loadable (QEMU, ...) drivers out; the
# test driver built into libvirt serves test:///default.
LIBVIRT_DRIVER_DIR="$TMP/drivers" "$LIBVIRTD" --listen \
    --config "$TMP/libvirtd.conf" --pid-file "$TMP/libvirtd.pid" \
    > "$TMP/libvirtd.out" 2>&1 &
LV_PID=$!

for _ in $(seq 100); do
    if ! kill -0 "$LV_PID" 2>/dev/null; then
        echo "demo: libvirtd failed to start:" >&2
        cat "$TMP/libvirtd.out" >&2
        exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$LV_PORT") 2>/dev/null; then
        break
    fi
    sleep 0.1
done

cat > "$TMP/virtmux.json" <<EOF
{
  "listeners": [
    {"name": "tcp", "address": "127.0.0.1:$GW_PORT", "auth": "none"}
  ],
  "upstreams": [
    {"name": "embedded", "uri": "test+tcp://127.0.0.1:$LV_PORT/default",
     "pool": {"max_connections": 4, "max_inflight": 4, "idle_timeout_s": 60}}
  ],
  "default_upstream": "embedded"
}
EOF

if [[ "$GW_PORT" == 16509 ]]; then
    TRY_URI="test+tcp://127.0.0.1/default"
else
    TRY_URI="test+tcp://127.0.0.1:$GW_PORT/default"
fi
echo "demo: libvirtd (test driver) on 127.0.0.1:$LV_PORT, files in $TMP"
echo "demo: virtmux on 127.0.0.1:$GW_PORT, config $TMP/virtmux.json"
echo "Try: virsh -c $TRY_URI list"
echo "(Ctrl-C to stop)"

# Run in the background and wait, so that INT/TERM reach the traps at once.
"$BUILD_DIR/proxy/virtmux" --config "$TMP/virtmux.json" -v &
GW_PID=$!
set +e
wait "$GW_PID"
rc=$?
set -e
GW_PID=""
exit $rc
