#!/usr/bin/env python3
"""The cost of domain grants: CONNECT_LIST_ALL_DOMAINS and CONNECT_GET_ALL_DOMAIN_STATS with
500 domains defined (250 running), through one gateway on three listeners, side by side:

- "all":   no grant (the reply is forwarded untouched);
- "every": a grant that matches every domain ("dom-*": each record is read, checked and
           copied, nothing is dropped: the worst case for the gateway);
- "half":  a grant that matches half of them ("dom-[0-4]*" on dom-000..dom-499).

One raw client per listener makes the calls one at a time for --seconds, the listeners take
turns for --rounds rounds, and the medians are compared.

usage: /usr/bin/python3 bench/bench_grants.py [--domains 500] [--seconds 2] [--rounds 5]
Prints a markdown section (paste into docs/BENCHMARKS.md).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import libvirt  # noqa: E402

import harness  # noqa: E402
from harness import RawClient, xdr_i32, xdr_u32  # noqa: E402

PROC_LIST_ALL = 273
PROC_ALL_STATS = 344
XML = "<domain type='test'><name>%s</name><memory>8192</memory>" \
      "<os><type>hvm</type></os></domain>"
LISTENERS = {"all": None, "every": ["dom-*"], "half": ["dom-[0-4]*"]}


def calls_per_s(client, proc, payload, seconds):
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        client.check_ok(client.call(proc, payload))
        n += 1
    return n / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    lvd = harness.Libvirtd()
    lvd.start()
    keeper = libvirt.open(lvd.direct_uri)
    for i in range(args.domains):
        dom = keeper.defineXML(XML % ("dom-%03d" % i))
        if i % 2 == 0:
            dom.create()
    listeners = [{"name": n, "address": "127.0.0.1:%d" % harness.free_port(), "auth": "none"}
                 for n in LISTENERS]
    # the cost of filtering per call, not sharing identical calls
    cfg = harness.make_config([harness.upstream_entry("hv1", lvd.direct_uri, coalesce=False)],
                              default_upstream="hv1", listeners=listeners,
                              log={"level": "warn"})
    cfg["policy"] = {"default": "deny", "rules": [
        dict({"match": {"listener": n}}, **({"domains": g} if g else {}))
        for n, g in LISTENERS.items()]}
    gw = harness.Virtmux(cfg, verbose=False)
    gw.start()
    clients = {}
    lines = []
    try:
        for lst in listeners:
            c = RawClient(port=harness.split_address(lst["address"])[1], timeout=30.0)
            c.handshake()
            clients[lst["name"]] = c
        calls = {"CONNECT_LIST_ALL_DOMAINS": (PROC_LIST_ALL, xdr_i32(1) + xdr_u32(0)),
                 "CONNECT_GET_ALL_DOMAIN_STATS": (PROC_ALL_STATS, xdr_u32(0) + xdr_u32(0)
                                                  + xdr_u32(0))}
        results = {}
        for cname, (proc, payload) in calls.items():
            rounds = {n: [] for n in LISTENERS}
            for n in LISTENERS:        # warm-up
                calls_per_s(clients[n], proc, payload, 0.3)
            for _ in range(args.rounds):
                for n in LISTENERS:
                    rounds[n].append(calls_per_s(clients[n], proc, payload, args.seconds))
            results[cname] = {n: sorted(v)[len(v) // 2] for n, v in rounds.items()}
        lines += [
            "## `bench/bench_grants.py`: the cost of domain grants",
            "",
            "Command: `/usr/bin/python3 bench/bench_grants.py --domains %d --seconds %g "
            "--rounds %d`" % (args.domains, args.seconds, args.rounds),
            "",
            "- Date: %s UTC; virtmux %s; %d domains defined, %d running; one raw client per "
            "listener, one call at a time, listeners alternated, medians of %d rounds."
            % (time.strftime("%Y-%m-%d %H:%M", time.gmtime()), harness.virtmux_binary(),
               args.domains, (args.domains + 1) // 2, args.rounds),
            "",
            "| call | no grant (calls/s) | grant matching all (calls/s, ratio) "
            "| grant matching half (calls/s, ratio) |",
            "|---|---|---|---|",
        ]
        for cname, r in results.items():
            lines.append("| %s | %.0f | %.0f (%.2f×) | %.0f (%.2f×) |" % (
                cname, r["all"], r["every"], r["every"] / r["all"], r["half"],
                r["half"] / r["all"]))
        lines.append("")
    finally:
        for c in clients.values():
            c.close()
        gw.stop()
        gw.cleanup()
        keeper.close()
        lvd.stop()
        lvd.cleanup()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
