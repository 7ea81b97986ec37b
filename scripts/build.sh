#!/usr/bin/env bash
# Configure (or reconfigure) and build virtmux into ./build.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${VIRTMUX_BUILD:-build}
if [[ -f "$BUILD_DIR/build.ninja" ]]; then
    meson setup --reconfigure "$BUILD_DIR"
else
    meson setup "$BUILD_DIR"
fi
ninja -C "$BUILD_DIR"
