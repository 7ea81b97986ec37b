#!/usr/bin/env bash
# Install the Debian packages virtmux needs to build and test.
# Idempotent: only runs apt-get when something is missing.
set -euo pipefail

PACKAGES=(
    build-essential meson ninja-build pkg-config
    libevent-dev libjansson-dev libssl-dev libsasl2-dev
    libvirt-daemon libvirt-clients python3-libvirt
    python3-pytest python3-pytest-timeout
    valgrind
    clang libclang-rt-dev
    sasl2-bin libsasl2-modules openssl
    krb5-kdc krb5-admin-server krb5-user libsasl2-modules-gssapi-mit
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "deps: all ${#PACKAGES[@]} packages present"
    exit 0
fi

echo "deps: installing ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "deps: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
