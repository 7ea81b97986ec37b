#!/usr/bin/env bash
# Install the Debian packages virtmux needs to build and test.
# Idempotent: only runs apt-get when something is missing.
#
#   bash scripts/deps.sh              # build + test (what CI and the quick start need)
#   bash scripts/deps.sh build        # only what building needs (the Docker build stage)
#   bash scripts/deps.sh docker       # the container test: Docker engine, compose, debootstrap
#   bash scripts/deps.sh build docker # groups combine
set -euo pipefail

BUILD_PACKAGES=(
    build-essential meson ninja-build pkg-config
    libevent-dev libjansson-dev libssl-dev libsasl2-dev
)
TEST_PACKAGES=(
    libvirt-daemon libvirt-clients python3-libvirt
    python3-pytest python3-pytest-timeout
    valgrind
    clang libclang-rt-dev
    sasl2-bin libsasl2-modules openssl
    krb5-kdc krb5-admin-server krb5-user libsasl2-modules-gssapi-mit
    groff-base man-db systemd
    python3-prometheus-client haproxy
)
DOCKER_PACKAGES=(
    docker.io docker-compose debootstrap
)

groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=(build test)
PACKAGES=()
for group in "${groups[@]}"; do
    case $group in
        build) PACKAGES+=("${BUILD_PACKAGES[@]}") ;;
        test) PACKAGES+=("${TEST_PACKAGES[@]}") ;;
        docker) PACKAGES+=("${DOCKER_PACKAGES[@]}") ;;
        *) echo "deps: unknown group '$group' (build, test, docker)" >&2; exit 2 ;;
    esac
done

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "deps: all ${#PACKAGES[@]} packages present (${groups[*]})"
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
