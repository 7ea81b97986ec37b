#!/usr/bin/python3
"""Gateway memory per SASL login: how much the resident set of virtmux grows
for every login, DIGEST-MD5 against SCRAM-SHA-256, on both of its sides.

  * server side: clients log in to the gateway (libvirt.openAuth, then
    close): DIGEST-MD5 over a plain TCP listener (with the security layer,
    RC4/DES from OpenSSL's legacy provider) and over a unix listener (no
    layer), SCRAM-SHA-256 over a unix listener.
  * client side: the gateway logs in to a SASL libvirtd as itself, once per
    upstream connection; every screenshot stream opens a dedicated upstream
    connection, so N screenshots through the gateway are N gateway logins:
    DIGEST-MD5 over TCP (with the layer), SCRAM-SHA-256 over libvirtd's unix
    socket.

For each case a fresh libvirtd and virtmux are started with
tests/e2e/harness.py; --warmup logins come first, then VmRSS of the
gateway (/proc/PID/status) is read before and after --logins more. The
result is kB per login; allocator noise is a few hundred kB in total, so
anything under ~0.5 kB/login at 500 logins is "flat".

Run as root with /usr/bin/python3 from the repository root after
scripts/build.sh (a sanitized build measures its quarantine, not leaks):

    /usr/bin/python3 bench/bench_sasl_memory.py [--logins 500]

Results are written to docs/RELIABILITY.md by hand.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import benchlib
from benchlib import harness

import pki  # noqa: E402 (tests/e2e is on sys.path through benchlib)

USER, PASSWORD = "alice", "secret"
GW_USER, GW_PASSWORD = "virtmux", "gw-secret"


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise benchlib.BenchError("no VmRSS for pid %d" % pid)


def measure(gw, one_login, warmup, n):
    for _ in range(warmup):
        one_login()
    before = rss_kb(gw.proc.pid)
    t0 = time.monotonic()
    for _ in range(n):
        one_login()
    return (rss_kb(gw.proc.pid) - before) / n, time.monotonic() - t0


def server_side(d, mech, transport, warmup, n):
    """Clients logging in to the gateway with `mech` over `transport`."""
    import libvirt
    db = pki.make_sasldb(os.path.join(d, "gw.sasldb"), {USER: PASSWORD})
    lvd = harness.Libvirtd(name="bench-lvd")
    gw = None
    try:
        lvd.start()
        sock = os.path.join(d, "gw.sock")
        listeners = [{"name": "tcp", "auth": "sasl",
                      "address": "127.0.0.1:%d" % harness.free_port()},
                     {"name": "unix", "auth": "sasl", "unix": sock}]
        gw = harness.Virtmux(harness.make_config(
            [harness.upstream_entry("hv1", lvd.direct_uri)],
            default_upstream="hv1", listeners=listeners,
            sasl={"sasldb": db, "mechanisms": [mech]}), verbose=False)
        gw.start()
        uri = ("test+tcp://127.0.0.1:%d/default" % gw.port
               if transport == "tcp" else
               "test+unix:///default?socket=%s" % sock)
        creds = pki.auth_callback(USER, PASSWORD)

        def login():
            libvirt.openAuth(uri, creds, 0).close()
        return measure(gw, login, warmup, n)
    finally:
        if gw is not None:
            gw.cleanup()
        lvd.cleanup()


def client_side(d, mech, transport, warmup, n):
    """The gateway logging in to libvirtd with `mech` over `transport`,
    once per screenshot stream."""
    import libvirt
    sasl_env = pki.libvirtd_sasl_env(os.path.join(d, "lvd-sasl"),
                                     {GW_USER: GW_PASSWORD}, mechs=mech)
    lvd = harness.Libvirtd(name="bench-lvd", env=sasl_env,
                           extra_conf={"auth_tcp": "sasl",
                                       "auth_unix_rw": "sasl"})
    gw = None
    try:
        lvd.start()
        up = harness.upstream_entry(
            "hv1", lvd.direct_uri if transport == "tcp" else lvd.unix_uri)
        up["sasl"] = {"username": GW_USER, "password_file":
                      pki.write_password_file(os.path.join(d, "gw.pw"),
                                              GW_PASSWORD)}
        gw = harness.Virtmux(harness.make_config([up], default_upstream="hv1"),
                             verbose=False)
        gw.start()
        conn = libvirt.open(gw.uri())
        dom = conn.lookupByName("test")

        def login():
            st = conn.newStream(0)
            dom.screenshot(st, 0, 0)
            while st.recv(65536):
                pass
            st.finish()
        try:
            return measure(gw, login, warmup, n)
        finally:
            conn.close()
    finally:
        if gw is not None:
            gw.cleanup()
        lvd.cleanup()


CASES = [
    ("server", "digest-md5", "tcp", server_side),
    ("server", "digest-md5", "unix", server_side),
    ("server", "scram-sha-256", "unix", server_side),
    ("client", "digest-md5", "tcp", client_side),
    ("client", "scram-sha-256", "unix", client_side),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logins", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()
    benchlib.check_prerequisites("bench_sasl_memory",
                                 harness.virtmux_binary())
    print("| side | mechanism | transport | kB per login | seconds |")
    print("|---|---|---|---|---|")
    for side, mech, transport, fn in CASES:
        d = tempfile.mkdtemp(prefix="virtmux-bench-sasl-")
        try:
            per, secs = fn(d, mech, transport, args.warmup, args.logins)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        print("| %s | %s | %s | %.2f | %.1f |"
              % (side, mech, transport, per, secs), flush=True)
    print("\n%d logins per case after %d warm-up logins; VmRSS of virtmux"
          % (args.logins, args.warmup))
    return 0


if __name__ == "__main__":
    benchlib.run_main(main, "bench_sasl_memory")
