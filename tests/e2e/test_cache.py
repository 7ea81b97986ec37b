"""Coalescing and the micro-cache (issue #13 items 3 and 4).

What reached libvirtd is counted by a relay between the gateway and libvirtd
(tap.py), never taken from the gateway's word; every answer is compared with
what a direct connection says. To make calls overlap, libvirtd is stopped
(SIGSTOP) while they are sent and resumed once they all wait.

Domains: "test" (the test driver's own, running), web-1 (running), web-2,
vault-1 (inactive). The "grant" listener's rule grants ["web-*"].
"""

import re
import threading
import time
import urllib.request

import libvirt
import pytest

import harness
import tap as tapmod
from harness import (PROC_CONNECT_LIST_ALL_DOMAINS, STATUS_ERROR, RawClient,
                     XdrReader, call_with_timeout, decode_error, wait_until,
                     xdr_i32, xdr_string, xdr_u32)
from test_grants import PROC, read_tsv

DOMAIN_XML = """<domain type='test'>
  <name>%s</name>
  <memory>8192</memory>
  <os><type>hvm</type></os>
</domain>
"""
NAMES = ["web-1", "web-2", "vault-1"]
CACHED = ["CONNECT_LIST_ALL_DOMAINS", "CONNECT_GET_ALL_DOMAIN_STATS",
          "DOMAIN_GET_INFO", "DOMAIN_GET_AUTOSTART", "CONNECT_GET_HOSTNAME"]
NCLIENTS = 20
VIR_ERR_NO_DOMAIN = 42


def define_domains(conn):
    for name in NAMES:
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError:
            conn.defineXML(DOMAIN_XML % name)
    dom = conn.lookupByName("web-1")
    if not dom.isActive():
        dom.create()


def make_hv(libvirtd, gateway, request, cache=None, coalesce=None):
    keeper = call_with_timeout(libvirt.open, libvirtd.direct_uri)
    request.addfinalizer(keeper.close)
    define_domains(keeper)
    tap = tapmod.Tap(libvirtd.port, max_conns=64)
    request.addfinalizer(tap.stop)
    listeners = [{"name": n, "address": "127.0.0.1:%d" % harness.free_port(),
                  "auth": "none"} for n in ("tcp", "ro", "grant")]
    listeners[1]["readonly"] = True
    pool = {"max_connections": 2}
    if coalesce is not None:
        pool["coalesce"] = coalesce
    up = harness.upstream_entry("hv1", tap.uri(), **pool)
    if cache is not None:
        up["cache"] = cache
    cfg = harness.make_config([up], default_upstream="hv1",
                              listeners=listeners, admin=True)
    cfg["policy"] = {"default": "deny", "rules": [
        {"match": {"listener": "grant"}, "domains": ["web-*"]},
        {"match": {"listener": "*"}},
    ]}
    gw = gateway(cfg)

    return harness.Endpoints(listeners, lvd=libvirtd, tap=tap, gw=gw,
                             direct=keeper)


def cache_cfg(ttl_ms, **kw):
    return dict({"ttl_ms": ttl_ms, "procedures": CACHED}, **kw)


def open_gw(h, listener, connections):
    fn = libvirt.openReadOnly if listener == "ro" else libvirt.open
    c = call_with_timeout(fn, h.uri[listener])
    connections.append(c)
    return c


def upstream(h, mark, name):
    return len(h.tap.calls(mark, proc=PROC[name]))


def metrics(h):
    """/metrics as {(family, frozenset(labels)): value}."""
    addr = h.gw.config["admin"]["address"]
    body = urllib.request.urlopen("http://%s/metrics" % addr,
                                  timeout=harness.scaled(5)).read().decode()
    out = {}
    for line in body.splitlines():
        m = re.match(r'^(virtmux_(?:cache|coalesced)\w*)\{(.*)\} (\S+)$', line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def counter(h, family, **labels):
    want = dict(labels, upstream="hv1")
    return sum(v for (f, ls), v in metrics(h).items()
               if f == family and all((k, v2) in ls for k, v2 in want.items()))


def names(doms):
    return sorted(d.name() for d in doms)


def overlapped(h, fns, settle=0.5):
    """Run every fn in its own thread while libvirtd is stopped, so their
    calls are all in flight at once; returns their CallResults."""
    h.lvd.sigstop()
    try:
        started = [harness.start_call(fn) for fn in fns]
        time.sleep(harness.scaled(settle))
    finally:
        h.lvd.sigcont()
    for t, _ in started:
        t.join(harness.scaled(30))
        assert not t.is_alive(), "a call never returned"
    return [r for _, r in started]


# --------------------------------------------------------------------------
# coalescing
# --------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["ro", "tcp"])
def test_identical_concurrent_calls_reach_libvirtd_once(libvirtd, gateway, request,
                                                        connections, listener):
    h = make_hv(libvirtd, gateway, request)
    conns = [open_gw(h, listener, connections) for _ in range(NCLIENTS)]
    want = names(h.direct.listAllDomains(0))
    before = counter(h, "virtmux_coalesced_calls_total")
    mark = h.tap.mark()
    results = overlapped(h, [c.listAllDomains for c in conns])
    for r in results:
        assert r.error is None, r.error
        assert names(r.value) == want
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 1
    assert counter(h, "virtmux_coalesced_calls_total") - before == NCLIENTS - 1


def test_coalescing_can_be_turned_off(libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request, coalesce=False)
    conns = [open_gw(h, "ro", connections) for _ in range(5)]
    mark = h.tap.mark()
    results = overlapped(h, [c.listAllDomains for c in conns])
    assert all(r.error is None for r in results)
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 5


def test_different_arguments_are_not_shared(libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request)
    conns = [open_gw(h, "ro", connections) for _ in range(4)]
    flags = [libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE,
             libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE] * 2
    mark = h.tap.mark()
    results = overlapped(h, [lambda c=c, f=f: c.listAllDomains(f)
                             for c, f in zip(conns, flags)])
    for r, f in zip(results, flags):
        assert names(r.value) == names(h.direct.listAllDomains(f))
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 2


def test_errors_are_shared_too(libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request)
    conns = [open_gw(h, "ro", connections) for _ in range(6)]
    try:
        h.direct.lookupByName("nosuch")
        raise AssertionError("the direct lookup did not fail")
    except libvirt.libvirtError as e:
        want = (e.get_error_code(), e.get_error_domain(), e.get_error_message())
    mark = h.tap.mark()
    results = overlapped(h, [lambda c=c: c.lookupByName("nosuch") for c in conns])
    for r in results:
        assert isinstance(r.error, libvirt.libvirtError), r.error
        assert (r.error.get_error_code(), r.error.get_error_domain(),
                r.error.get_error_message()) == want
        assert want[0] == VIR_ERR_NO_DOMAIN
    assert upstream(h, mark, "DOMAIN_LOOKUP_BY_NAME") == 1


def test_callers_leaving_do_not_break_the_others(libvirtd, gateway, request):
    """The first caller (whose call went upstream) and another one hang up
    while the shared call is in flight: the others still get the reply, and
    the gateway keeps serving."""
    h = make_hv(libvirtd, gateway, request)
    clients = []
    for _ in range(5):
        rc = RawClient(port=h.port["ro"], timeout=harness.scaled(20))
        request.addfinalizer(rc.close)
        rc.handshake(readonly=True)
        clients.append(rc)
    want = sorted(d.name() for d in h.direct.listAllDomains(0))
    payload = xdr_i32(1) + xdr_u32(0)
    mark = h.tap.mark()
    h.lvd.sigstop()
    try:
        serials = []
        for rc in clients:
            s = rc.next_serial()
            rc.send_packet(harness.REMOTE_PROGRAM, harness.REMOTE_VERSION,
                           PROC_CONNECT_LIST_ALL_DOMAINS, harness.TYPE_CALL, s,
                           harness.STATUS_OK, payload)
            serials.append(s)
        assert h.tap.wait_for(lambda fr: [f for f in fr if f.seq >= mark and
                                          f.proc == PROC_CONNECT_LIST_ALL_DOMAINS],
                              timeout=harness.scaled(5))
        time.sleep(harness.scaled(0.3))
        clients[0].close()
        clients[2].close()
        time.sleep(harness.scaled(0.3))
    finally:
        h.lvd.sigcont()
    for i in (1, 3, 4):
        pkt = clients[i].recv_packet(timeout=harness.scaled(20))
        assert pkt.serial == serials[i] and pkt.status == harness.STATUS_OK
        r = XdrReader(pkt.payload)
        assert sorted(r.domain()["name"] for _ in range(r.u32())) == want
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 1
    # and the pool still works, for a new call too
    assert sorted(d["name"] for d in clients[1].list_all_domains()) == want


def test_grant_sessions_share_the_call_but_see_only_their_domains(
        libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request)
    full = [open_gw(h, "tcp", connections) for _ in range(3)]
    limited = [open_gw(h, "grant", connections) for _ in range(3)]
    mark = h.tap.mark()
    results = overlapped(h, [c.listAllDomains for c in full + limited])
    everything = names(h.direct.listAllDomains(0))
    for r in results[:3]:
        assert names(r.value) == everything
    for r in results[3:]:
        assert names(r.value) == ["web-1", "web-2"]
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 1


# --------------------------------------------------------------------------
# the micro-cache
# --------------------------------------------------------------------------

def warm(h, fn):
    """The first cacheable call makes the cache's lifecycle registration;
    replies are stored once it is active."""
    mark = h.tap.mark()
    fn()
    assert h.tap.wait_for(lambda fr: [
        f for f in fr if f.seq >= mark and
        f.proc == PROC["CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY"]],
        timeout=harness.scaled(5))
    time.sleep(harness.scaled(0.2))


def test_calls_within_ttl_reach_libvirtd_once(libvirtd, gateway, request, connections):
    ttl = int(harness.scaled(3.0) * 1000)
    h = make_hv(libvirtd, gateway, request, cache=cache_cfg(ttl))
    c = open_gw(h, "ro", connections)
    others = [open_gw(h, "ro", connections) for _ in range(3)]
    warm(h, c.listAllDomains)
    want = names(h.direct.listAllDomains(0))
    hits = counter(h, "virtmux_cache_hits_total")
    mark = h.tap.mark()
    t0 = time.monotonic()
    for conn in [c] + others:
        for _ in range(5):
            assert names(conn.listAllDomains(0)) == want
    assert time.monotonic() - t0 < ttl / 1000.0, "too slow to test within the ttl"
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 1
    assert counter(h, "virtmux_cache_hits_total") - hits == 19
    [ro] = [p for p in h.gw.status()["pools"] if p["readonly"]]
    assert ro["cache_entries"] == 1 and ro["shared_calls"] == 0, ro
    # after the ttl, the next call goes upstream again
    time.sleep(ttl / 1000.0 + 0.1)
    mark = h.tap.mark()
    assert names(c.listAllDomains(0)) == want
    assert names(c.listAllDomains(0)) == want
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 1


def test_cached_stats_are_the_upstream_bytes(libvirtd, gateway, request, connections):
    """GET_ALL_DOMAIN_STATS from the cache equals what libvirtd says, for
    every caller, and DOMAIN_GET_INFO per domain is keyed by its handle."""
    h = make_hv(libvirtd, gateway, request, cache=cache_cfg(60000))
    a, b = open_gw(h, "ro", connections), open_gw(h, "ro", connections)
    warm(h, a.listAllDomains)
    mark = h.tap.mark()
    for conn in (a, b, a):
        stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
        got = sorted((d.name(), s["state.state"]) for d, s in stats)
        want = sorted((d.name(), s["state.state"]) for d, s in
                      h.direct.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE))
        assert got == want
        for name in ("web-1", "web-2"):
            # cpuTime moves on a running test domain: up to the ttl old here
            assert conn.lookupByName(name).info()[:4] == \
                h.direct.lookupByName(name).info()[:4]
    assert upstream(h, mark, "CONNECT_GET_ALL_DOMAIN_STATS") == 1
    assert upstream(h, mark, "DOMAIN_GET_INFO") == 2


def test_lifecycle_event_invalidates(libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request, cache=cache_cfg(600000))
    c = open_gw(h, "ro", connections)
    active = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    warm(h, lambda: c.listAllDomains(active))
    before = names(c.listAllDomains(active))
    assert names(c.listAllDomains(active)) == before  # a hit
    assert "web-2" not in before
    inval = counter(h, "virtmux_cache_invalidations_total", reason="event")
    h.direct.lookupByName("web-2").create()  # directly, not through the gateway
    request.addfinalizer(lambda: h.direct.lookupByName("web-2").destroy())
    assert wait_until(lambda: "web-2" in names(c.listAllDomains(active)),
                      timeout=harness.scaled(5)), "stale reply after a lifecycle event"
    assert counter(h, "virtmux_cache_invalidations_total", reason="event") > inval


def test_write_through_the_gateway_invalidates(libvirtd, gateway, request, connections):
    """DOMAIN_SET_AUTOSTART raises no lifecycle event: only the write itself
    can tell the read-only pool's cache."""
    h = make_hv(libvirtd, gateway, request, cache=cache_cfg(600000))
    ro = open_gw(h, "ro", connections)
    rw = open_gw(h, "tcp", connections)
    dom = ro.lookupByName("web-2")
    warm(h, dom.autostart)
    assert dom.autostart() == 0
    mark = h.tap.mark()
    assert dom.autostart() == 0
    assert upstream(h, mark, "DOMAIN_GET_AUTOSTART") == 0  # served from the cache
    events = counter(h, "virtmux_cache_invalidations_total", reason="event")
    writes = counter(h, "virtmux_cache_invalidations_total", reason="write")
    rw.lookupByName("web-2").setAutostart(1)
    assert dom.autostart() == 1
    assert upstream(h, mark, "DOMAIN_GET_AUTOSTART") == 1
    assert counter(h, "virtmux_cache_invalidations_total", reason="write") > writes
    assert counter(h, "virtmux_cache_invalidations_total", reason="event") == events


@pytest.mark.parametrize("readwrite", [False, True])
def test_readwrite_sessions_get_cached_replies_only_if_configured(
        libvirtd, gateway, request, connections, readwrite):
    h = make_hv(libvirtd, gateway, request,
                cache=cache_cfg(600000, readwrite=readwrite))
    c = open_gw(h, "tcp", connections)
    if readwrite:
        warm(h, c.getHostname)
    else:
        c.getHostname()
        time.sleep(harness.scaled(0.2))
    mark = h.tap.mark()
    for _ in range(5):
        assert c.getHostname() == h.direct.getHostname()
    # with the cache: the first reply after the registration is active is stored
    assert upstream(h, mark, "CONNECT_GET_HOSTNAME") == (1 if readwrite else 5)
    if not readwrite:
        assert counter(h, "virtmux_cache_hits_total") == 0


def test_cache_is_off_by_default(libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request)
    c = open_gw(h, "ro", connections)
    c.listAllDomains()
    time.sleep(harness.scaled(0.2))
    mark = h.tap.mark()
    for _ in range(5):
        c.listAllDomains()
    assert upstream(h, mark, "CONNECT_LIST_ALL_DOMAINS") == 5
    assert not h.tap.calls(0, proc=PROC["CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY"])
    assert counter(h, "virtmux_cache_hits_total") == 0


def test_entries_are_bounded(libvirtd, gateway, request, connections):
    h = make_hv(libvirtd, gateway, request,
                cache=cache_cfg(600000, max_entries=1))
    c = open_gw(h, "ro", connections)
    web1, web2 = c.lookupByName("web-1"), c.lookupByName("web-2")
    warm(h, web1.info)
    web1.info()          # stored (the only entry)
    web2.info()          # stored, web-1's entry goes
    mark = h.tap.mark()
    web2.info()          # hit
    web1.info()          # miss again
    assert upstream(h, mark, "DOMAIN_GET_INFO") == 1


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

def _check(virtmux_bin, cache):
    up = harness.upstream_entry("hv1", "test:///default")
    up["cache"] = cache
    cfg = harness.make_config([up], default_upstream="hv1")
    return harness.check_config(cfg, virtmux_bin)


@pytest.mark.parametrize("proc", ["DOMAIN_SET_AUTOSTART", "DOMAIN_GET_XML_DESC",
                                  "DOMAIN_OPEN_CONSOLE",
                                  "CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY",
                                  "NOSUCH_PROCEDURE"])
def test_config_refuses_procedures_that_cannot_be_cached(virtmux_bin, proc):
    r = _check(virtmux_bin, {"ttl_ms": 1000, "procedures": [proc]})
    assert r.returncode != 0
    assert "upstreams[0].cache.procedures" in r.stderr and proc in r.stderr, r.stderr


@pytest.mark.parametrize("cache", [{"ttl_ms": 1000}, {"procedures": []},
                                   {"procedures": CACHED, "ttl": 5},
                                   {"procedures": CACHED, "ttl_ms": 0},
                                   {"procedures": CACHED, "max_bytes": 10}])
def test_config_errors_name_the_key(virtmux_bin, cache):
    r = _check(virtmux_bin, cache)
    assert r.returncode != 0
    assert "upstreams[0].cache" in r.stderr, r.stderr


def test_config_accepts_every_yes_call(virtmux_bin):
    rows = read_tsv(harness.REPO_ROOT / "data" / "procedures.tsv")
    ok = [r["name"] for r in rows if r["program"] == "REMOTE" and
          r["readonly_ok"] == "yes" and r["kind"] == "call"]
    r = _check(virtmux_bin, {"procedures": ok, "readwrite": True,
                             "max_entries": 10, "max_bytes": 1 << 20})
    # FD-passing calls of verdict yes (if any) are the only ones refused
    assert r.returncode == 0 or all("FD" in l or "descriptor" in l
                                    for l in r.stderr.splitlines() if l), r.stderr
