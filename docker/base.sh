#!/usr/bin/env bash
# Make the Debian 12 (bookworm) base image the Dockerfile builds FROM, without
# any image registry: debootstrap a minbase root file system from the Debian
# mirror this machine's apt already uses, then `docker import` it.
#
#   bash docker/base.sh [TAG]        # default TAG: virtmux-base:bookworm
#
# The image is cached by tag: when the Docker engine (DOCKER_HOST, or the
# default socket) already has TAG, nothing is done. VIRTMUX_BASE_ROOTFS=DIR
# keeps the debootstrapped tree in DIR (the test without dockerd reuses it);
# otherwise a temporary directory is used and removed. Needs root.
set -euo pipefail

TAG=${1:-virtmux-base:bookworm}
DOCKER=${DOCKER:-/usr/bin/docker}

log() { echo "base: $*" >&2; }

# The first apt source (one-line .list or deb822 .sources) that serves the
# suite $1 from a Debian archive: deb.debian.org, a mirror, or a snapshot.
# Prints the URI; nothing if there is none.
debian_mirror() {
    /usr/bin/python3 - "$1" <<'PY'
import glob, re, sys

SUITE = sys.argv[1]

def one_line(path):
    for line in open(path, encoding="utf-8", errors="replace"):
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb" and line[2] == SUITE:
            yield line[1]

def deb822(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    for para in re.split(r"\n\s*\n", text):
        fields = {}
        for line in para.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if ("deb" in fields.get("types", []) and SUITE in fields.get("suites", [])
                and fields.get("enabled", ["yes"])[0] != "no"):
            yield from fields.get("uris", [])

files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*"))
for path in files:
    try:
        gen = deb822(path) if path.endswith(".sources") else one_line(path)
        for uri in gen:
            print(uri.rstrip("/"))
            raise SystemExit(0)
    except OSError:
        pass
PY
}

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG is cached"
    exit 0
fi

MIRROR=${VIRTMUX_DEBIAN_MIRROR:-$(debian_mirror bookworm)}
if [[ -z "$MIRROR" ]]; then
    log "no apt source for bookworm in /etc/apt/sources.list(.d); set VIRTMUX_DEBIAN_MIRROR"
    exit 1
fi
SECURITY=${VIRTMUX_DEBIAN_SECURITY:-$(debian_mirror bookworm-security)}

# debootstrap mounts proc and sys inside the tree while it works: an
# interrupted run leaves them there, and rm -rf must never walk into them.
unmount_under() {
    local dir
    dir=$(realpath -m "$1")
    awk -v d="$dir/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" || true; done
}

cleanup_rootfs=""
if [[ -n "${VIRTMUX_BASE_ROOTFS:-}" ]]; then
    ROOTFS=$VIRTMUX_BASE_ROOTFS
else
    ROOTFS=$(mktemp -d /tmp/virtmux-base.XXXXXX)
    cleanup_rootfs=$ROOTFS
fi
trap '[[ -z "$cleanup_rootfs" ]] || { unmount_under "$cleanup_rootfs"; rm -rf "$cleanup_rootfs"; }' EXIT

if [[ ! -x "$ROOTFS/usr/bin/apt-get" ]]; then
    log "debootstrap --variant=minbase bookworm from $MIRROR into $ROOTFS"
    unmount_under "$ROOTFS"
    rm -rf "$ROOTFS"
    mkdir -p "$ROOTFS"
    if ! debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" \
            > "$ROOTFS.debootstrap.log" 2>&1; then
        tail -20 "$ROOTFS.debootstrap.log" >&2
        log "debootstrap failed (whole log: $ROOTFS.debootstrap.log)"
        exit 1
    fi
    rm -f "$ROOTFS.debootstrap.log"
fi

# The image's apt uses the same archive, with updates and security as on a
# stock Debian image, and keeps no package lists or .debs.
rm -f "$ROOTFS/etc/apt/sources.list"
cat > "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
if [[ -n "$SECURITY" ]]; then
    cat >> "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF

Types: deb
URIs: $SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
cat > "$ROOTFS/etc/apt/apt.conf.d/90virtmux-slim" <<'EOF'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
cat > "$ROOTFS/etc/dpkg/dpkg.cfg.d/90virtmux-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
EOF
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*

log "importing $ROOTFS as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . |
    "$DOCKER" import --change 'CMD ["/bin/bash"]' \
        --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
log "$TAG ready"
