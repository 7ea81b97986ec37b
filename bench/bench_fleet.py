#!/usr/bin/env python3
"""Fleet figures (issue #13 item 2): what an upstream costs the gateway idle and in use.

1. RSS per idle upstream: the gateway with K named upstreams that nobody uses, against one
   with a single upstream, and with K upstream templates' worth of names (a template makes
   nothing until first use).
2. RSS per active pool: H test-driver libvirtds on 127.0.X.Y (one port), one template;
   one raw client session per host (each pool one connection); then, separately, H sessions
   on a single host (the sessions' share); the difference per host is the pool's.
3. After everyone leaves: RSS once every pool went idle and was freed.
4. Cold host: time from TCP connect to the first CONNECT_LIST_ALL_DOMAINS reply for a host
   the gateway has no pool for (made from the template on this OPEN), against the same
   direct to its libvirtd; median over the hosts.

usage: /usr/bin/python3 bench/bench_fleet.py [--hosts 200] [--idle-upstreams 1000]
Prints a markdown section (paste into docs/BENCHMARKS.md).
"""

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import harness  # noqa: E402
import test_fleet as tf  # noqa: E402


def gateway(upstreams, templates=None, hosts=1):
    cfg = harness.make_config(upstreams, admin=True, log={"level": "warn"},
                              limits={"max_upstreams": max(hosts, 1), "max_clients": 20000})
    if templates:
        cfg["upstream_templates"] = templates
    gw = harness.Virtmux(cfg, verbose=False)
    gw.start()
    time.sleep(0.3)
    return gw


def idle_upstreams(k):
    """(KiB per idle named upstream, KiB for k template-matchable names)."""
    one = gateway([harness.upstream_entry("u0", "test+tcp://127.0.0.1:1/default")])
    base = tf.rss_kib(one.proc.pid)
    one.cleanup()
    many = gateway([harness.upstream_entry("u%d" % i, "test+tcp://10.9.%d.%d:16509/default"
                                           % (i // 250, i % 250 + 1)) for i in range(k)])
    rss_many = tf.rss_kib(many.proc.pid)
    many.cleanup()
    tpl = gateway([harness.upstream_entry("u0", "test+tcp://127.0.0.1:1/default")],
                  templates=[{"match": "10.*", "uri": "test+tcp://{name}:16509/default"}])
    rss_tpl = tf.rss_kib(tpl.proc.pid)
    tpl.cleanup()
    return base, rss_many, (rss_many - base) / (k - 1), rss_tpl


async def sessions(port, names):
    scrapes = []
    for host_index, name in names:
        s = tf.Scrape(host_index, "")
        s.name = name
        scrapes.append(s)
    await tf.bounded([s.connect(port) for s in scrapes])
    await tf.bounded([s.open() for s in scrapes])
    for s in scrapes:
        problems = await s.round()
        assert not problems, problems
    return scrapes


async def close_all(scrapes):
    for s in scrapes:
        await s.close()


def name_of(i, tmp):
    return "test:///%s%s/h%d.xml" % (tf.host_addr(i), tmp, i)


async def cold_first_call(port, name, host_index):
    s = tf.Scrape(host_index, "")
    s.name = name
    t0 = time.monotonic()
    await s.connect(port)
    await s.open()
    problems = await s.round()
    dt = time.monotonic() - t0
    await s.close()
    assert not problems, problems
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--idle-upstreams", type=int, default=1000)
    a = ap.parse_args()

    base, rss_many, per_idle, rss_tpl = idle_upstreams(a.idle_upstreams)

    tmp = tempfile.mkdtemp(prefix="virtmux-benchfleet-")
    port = harness.free_port()
    daemons = []
    try:
        for i in range(a.hosts):
            with open(os.path.join(tmp, "h%d.xml" % i), "w") as f:
                f.write(tf.NODE_XML % tf.domain_of(i))
            d = harness.Libvirtd(name="bf%d" % i, host=tf.host_addr(i), port=port,
                                 start_timeout=60)
            daemons.append(d)
            d.spawn()
        for d in daemons:
            d.wait_ready()
        tpl = [{"match": "127.0.*", "uri": "test+tcp://{name}:%d/default" % port,
                "pool": {"max_connections": 1, "idle_timeout_s": 1}}]

        # 4. cold hosts first (each host is new to this gateway), then direct
        gw = gateway([], templates=tpl, hosts=a.hosts)
        cold_gw = [asyncio.run(cold_first_call(gw.port, name_of(i, tmp), i))
                   for i in range(a.hosts)]
        cold_direct = []
        for i in range(a.hosts):
            s_name = "test://%s" % os.path.join(tmp, "h%d.xml" % i)

            async def direct():
                s = tf.Scrape(i, "")
                s.name = "test:///%s" % os.path.join(tmp, "h%d.xml" % i).lstrip("/")
                t0 = time.monotonic()
                s.reader, s.writer = await asyncio.open_connection(tf.host_addr(i), port)
                s.task = asyncio.ensure_future(s.read_loop())
                await s.open()
                problems = await s.round()
                dt = time.monotonic() - t0
                await s.close()
                assert not problems, (s_name, problems)
                return dt
            cold_direct.append(asyncio.run(direct()))
        gw.cleanup()

        # 2. one session per host (H pools) vs H sessions on one host
        gw = gateway([], templates=tpl, hosts=a.hosts)
        start = tf.rss_kib(gw.proc.pid)
        loop = asyncio.new_event_loop()
        scr = loop.run_until_complete(sessions(gw.port, [(i, name_of(i, tmp))
                                                         for i in range(a.hosts)]))
        pools_rss = tf.rss_kib(gw.proc.pid)
        st = gw.status()
        assert st["dynamic_upstreams"]["count"] == a.hosts
        loop.run_until_complete(close_all(scr))
        harness.wait_until(lambda: gw.status()["totals"]["pools"] == 0, timeout=30)
        time.sleep(3)
        idle_rss = tf.rss_kib(gw.proc.pid)
        gw.cleanup()

        gw = gateway([], templates=tpl, hosts=a.hosts)
        start1 = tf.rss_kib(gw.proc.pid)
        scr = loop.run_until_complete(sessions(gw.port, [(0, name_of(0, tmp))] * a.hosts))
        one_host_rss = tf.rss_kib(gw.proc.pid)
        loop.run_until_complete(close_all(scr))
        loop.close()
        gw.cleanup()
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.terminate()
        for d in daemons:
            d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    per_session = (one_host_rss - start1) / a.hosts
    per_pool_and_session = (pools_rss - start) / a.hosts
    med_gw = statistics.median(cold_gw) * 1000
    med_direct = statistics.median(cold_direct) * 1000
    print("## `bench/bench_fleet.py`: upstream templates at fleet scale\n")
    print("%d test-driver libvirtds on 127.0.X.Y, one template; %d named idle upstreams.\n"
          % (a.hosts, a.idle_upstreams))
    print("| figure | value |")
    print("|---|---|")
    print("| gateway RSS, 1 upstream | %d KiB |" % base)
    print("| gateway RSS, %d named upstreams, none used | %d KiB |" % (a.idle_upstreams,
                                                                       rss_many))
    print("| RSS per idle named upstream | %.2f KiB |" % per_idle)
    print("| gateway RSS, 1 upstream + a template matching every 10.* name, none used | "
          "%d KiB (a template costs nothing until a name is used) |" % rss_tpl)
    print("| RSS per active pool (upstream made from the template + pool + 1 connection), "
          "excluding its session | %.1f KiB |" % (per_pool_and_session - per_session))
    print("| RSS per session (read-only raw client, after 2 calls) | %.1f KiB |" % per_session)
    print("| gateway RSS: start / %d hosts in use (1 session each) / all idle and freed | "
          "%d / %d / %d KiB |" % (a.hosts, start, pools_rss, idle_rss))
    print("| cold host, connect to first LIST_ALL_DOMAINS + GET_ALL_DOMAIN_STATS reply, "
          "median: through a template / direct | %.2f ms / %.2f ms (%.2fx) |"
          % (med_gw, med_direct, med_gw / med_direct))


if __name__ == "__main__":
    main()
