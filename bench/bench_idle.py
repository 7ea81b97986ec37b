#!/usr/bin/env python3
"""Idle sessions: what they cost the gateway, and what they cost an active client.

1. Gateway RSS per idle session: N raw clients (AUTH_LIST + CONNECT_OPEN each, then silent)
   held open through virtmux; VmRSS before and after, divided by N; also the upstream
   connections libvirtd sees (virt-admin).
2. One active client's calls/s (bench/loadgen, DOMAIN_GET_INFO, 1 connection, depth 1) while
   M idle clients are connected, through the gateway and direct to libvirtd, side by side.

usage: /usr/bin/python3 bench/bench_idle.py [--sessions 10000] [--idle 4000] [--seconds 4]
Prints a markdown section (paste into docs/BENCHMARKS.md).
"""

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import harness  # noqa: E402


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def packet(proc, serial, payload=b""):
    body = struct.pack(">IIiiIi", harness.REMOTE_PROGRAM, 1, proc, 0, serial, 0) + payload
    return struct.pack(">I", len(body) + 4) + body


OPEN = packet(harness.PROC_AUTH_LIST, 0) + packet(
    harness.PROC_CONNECT_OPEN, 1, harness.xdr_opt_string("test:///default") + struct.pack(">I", 0))


def open_idle(port, n):
    """n sockets that each sent AUTH_LIST + CONNECT_OPEN; waits for both replies."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(OPEN)
        socks.append(s)
    for s in socks:
        s.settimeout(30)
        got = b""
        while got.count(b"\x20\x00\x80\x86") < 2:   # two replies (program word)
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("peer closed during open")
            got += chunk
    return socks


def loadgen(port, seconds):
    lg = harness.build_dir() / "bench" / "loadgen"
    out = subprocess.run([str(lg), "--uri-tcp", "127.0.0.1:%d" % port, "--name",
                          "test:///default", "-c", "1", "-d", "1", "-t", str(seconds),
                          "--warmup", "1", "--proc", "getinfo"],
                         capture_output=True, text=True, timeout=seconds + 60)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--idle", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lvd = harness.Libvirtd(extra_conf={"max_clients": 20000, "max_anonymous_clients": 20000,
                                       "max_client_requests": 64})
    lvd.start()
    cfg = harness.make_config([harness.upstream_entry("hv1", lvd.direct_uri,
                                                      max_connections=8, max_inflight=32)],
                              default_upstream="hv1",
                              limits={"max_clients": 30000, "max_client_requests": 64},
                              log={"level": "warn"})
    gw = harness.Virtmux(cfg, verbose=False)
    gw.start()
    lines = []
    try:
        # 1. RSS per idle session
        time.sleep(0.5)
        before = rss_kib(gw.proc.pid)
        socks = open_idle(gw.port, args.sessions)
        time.sleep(1.0)
        after = rss_kib(gw.proc.pid)
        per = (after - before) / args.sessions
        upstream = lvd.nclients()
        for s in socks:
            s.close()
        socks = None
        # 2. one active client with M idle ones, gateway vs direct, alternated
        rounds = []
        for _ in range(3):
            # each path with its own idle crowd only: libvirtd's loop polls every client
            idle = open_idle(gw.port, args.idle)
            g = loadgen(gw.port, args.seconds)
            for s in idle:
                s.close()
            idle = open_idle(lvd.port, args.idle)
            d = loadgen(lvd.port, args.seconds)
            for s in idle:
                s.close()
            rounds.append((g["calls_per_s"], d["calls_per_s"]))
            time.sleep(1.0)
        med_g = sorted(r[0] for r in rounds)[1]
        med_d = sorted(r[1] for r in rounds)[1]
        lines += [
            "## `bench/bench_idle.py`: idle sessions",
            "",
            "Command: `/usr/bin/python3 bench/bench_idle.py --sessions %d --idle %d`"
            % (args.sessions, args.idle),
            "",
            "- Date: %s UTC; virtmux %s" % (time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                           harness.virtmux_binary()),
            "- %d idle sessions (AUTH_LIST + CONNECT_OPEN, then silent): gateway RSS %d KiB "
            "before, %d KiB after: **%.2f KiB per idle session**; libvirtd saw %d upstream "
            "connections for them." % (args.sessions, before, after, per, upstream),
            "- One active client (loadgen, DOMAIN_GET_INFO, 1 connection, depth 1) while %d "
            "idle clients are connected, 3 rounds alternated, medians: through virtmux %.0f "
            "calls/s, direct %.0f calls/s: **%.2f×**. Rounds (virtmux, direct): %s."
            % (args.idle, med_g, med_d, med_g / med_d,
               ", ".join("(%.0f, %.0f)" % r for r in rounds)),
            "",
        ]
    finally:
        gw.stop()
        gw.cleanup()
        lvd.stop()
        lvd.cleanup()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
