"""Events are relayed, and relayed exactly as libvirtd sends them.

Callback events (feature 14) are the contract: through the gateway a
subscriber sees the same events, with the same contents, as a subscriber
connected straight to libvirtd; only the callbackID word differs (it is the
subscriber's own). Legacy registration is refused with VIR_ERR_NO_SUPPORT.
Fan-out, churn, slow subscribers and restarts: test_events_fanout.py;
streams: test_streams.py; close callbacks: test_close_callback.py."""

import time

import libvirt
import pytest

import harness
from harness import (RawClient, call_with_timeout, wait_until, xdr_i32,
                     xdr_u32)

NO_SUPPORT = harness.VIR_ERR_NO_SUPPORT
VIR_ERR_INVALID_ARG = 8

PROC_CONNECT_DOMAIN_EVENT_REGISTER = 105          # legacy
PROC_CONNECT_DOMAIN_EVENT_DEREGISTER = 106
PROC_CONNECT_DOMAIN_EVENT_REGISTER_ANY = 167      # legacy
PROC_CONNECT_DOMAIN_EVENT_DEREGISTER_ANY = 168
PROC_NETWORK_REGISTER, PROC_NETWORK_DEREGISTER = 313, 314
PROC_NETWORK_EVENT_LIFECYCLE = 315
PROC_POOL_REGISTER, PROC_POOL_DEREGISTER = 368, 369
PROC_POOL_EVENT_LIFECYCLE = 370


@pytest.fixture
def setup(libvirtd, gateway):
    gw = gateway(harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri)],
        default_upstream="hv1", admin=True))
    ctl = call_with_timeout(libvirt.open, libvirtd.direct_uri, timeout=10)
    yield libvirtd, gw, ctl
    t, _ = harness.start_call(ctl.close)
    t.join(5)


def define_start_destroy_undefine(ctl, name):
    dom = ctl.defineXML("<domain type='test'><name>%s</name>"
                        "<memory>65536</memory><os><type>hvm</type></os>"
                        "</domain>" % name)
    dom.create()
    dom.destroy()
    dom.undefine()


def lifecycle_of(ec, name, n, timeout=10.0):
    """[[name, event, detail], ...] per connection of `ec`, once each has
    n events about `name` (bounded wait)."""
    def get():
        return [[e[1:] for e in evs if e[1] == name]
                for evs in ec.events()["events"]]
    wait_until(lambda: all(len(x) >= n for x in get()), timeout)
    time.sleep(0.3)                     # anything extra would arrive now
    return get()


def test_lifecycle_events_same_as_direct(setup, event_clients):
    lvd, gw, ctl = setup
    via = event_clients()
    assert via.open(gw.uri(), n=2)["errors"] == []
    direct = event_clients()
    assert direct.open(lvd.direct_uri, n=1)["errors"] == []

    define_start_destroy_undefine(ctl, "ev-same")
    expected = lifecycle_of(direct, "ev-same", 4)[0]
    # defined, started, stopped (destroyed), undefined
    assert [e[:2] for e in expected] == [["ev-same", 0], ["ev-same", 2],
                                         ["ev-same", 5], ["ev-same", 1]]
    assert lifecycle_of(via, "ev-same", 4) == [expected, expected]
    assert via.request(op="deregister")["deregister"] == ["ok", "ok"]
    assert gw.event_counts() == (0, 0)


def test_legacy_api_rides_callback_events(setup, event_clients):
    """virConnectDomainEventRegister (the old API) works through the
    gateway: the client library uses callback registration underneath,
    because the gateway advertises feature 14."""
    lvd, gw, ctl = setup
    ec = event_clients()
    opened = ec.open(gw.uri(), n=1, legacy=True)
    assert opened == {"ids": ["legacy"], "errors": []}
    assert gw.event_counts() == (1, 1)
    define_start_destroy_undefine(ctl, "ev-legacy")
    got = lifecycle_of(ec, "ev-legacy", 4)
    assert [[e[:2] for e in evs] for evs in got] == [
        [["ev-legacy", 0], ["ev-legacy", 2], ["ev-legacy", 5],
         ["ev-legacy", 1]]]
    assert ec.request(op="deregister")["deregister"] == ["ok"]
    assert gw.event_counts() == (0, 0)


@pytest.mark.parametrize("proc,args", [
    (PROC_CONNECT_DOMAIN_EVENT_REGISTER, b""),
    (PROC_CONNECT_DOMAIN_EVENT_DEREGISTER, b""),
    (PROC_CONNECT_DOMAIN_EVENT_REGISTER_ANY, xdr_i32(0)),
    (PROC_CONNECT_DOMAIN_EVENT_DEREGISTER_ANY, xdr_i32(0)),
], ids=["register", "deregister", "register_any", "deregister_any"])
def test_legacy_registration_refused(setup, proc, args):
    lvd, gw, ctl = setup
    with RawClient(port=gw.port) as c:
        c.handshake()
        pkt = c.call(proc, args)
        assert (pkt.type, pkt.proc, pkt.status) == (
            harness.TYPE_REPLY, proc, harness.STATUS_ERROR)
        err = harness.decode_error(pkt.payload)
        assert err["code"] == NO_SUPPORT, err
        assert err["message"].startswith(
            "this function is not supported by the connection driver: ")
        assert "legacy event registration" in err["message"]
        # nothing was registered, and the session goes on
        assert gw.event_counts() == (0, 0)
        assert [d["name"] for d in c.list_all_domains()] == ["test"]


def test_other_event_families(setup, raw_subscribers):
    """Network and storage-pool callback events: one registration per
    family and filter, callback ids per session across families."""
    lvd, gw, ctl = setup
    none = xdr_i32(0) + xdr_u32(0)      # lifecycle, no object filter
    a = raw_subscribers(port=gw.port)
    b = raw_subscribers(port=gw.port)
    ids = {}
    for sub, order in ((a, (PROC_NETWORK_REGISTER, PROC_POOL_REGISTER)),
                       (b, (PROC_POOL_REGISTER, PROC_NETWORK_REGISTER))):
        for proc in order:
            pkt = RawClient.check_ok(sub.call(proc, none))
            ids[(id(sub), proc)] = harness.XdrReader(pkt.payload).i32()
    assert [ids[(id(a), p)] for p in (313, 368)] == [0, 1]
    assert [ids[(id(b), p)] for p in (313, 368)] == [1, 0]
    assert gw.event_counts() == (2, 4)
    a.start()
    b.start()

    net = ctl.networkLookupByName("default")
    net.destroy()
    net.create()
    pool = ctl.storagePoolLookupByName("default-pool")
    pool.destroy()
    pool.create()

    for sub in (a, b):
        assert sub.wait_events(4, timeout=10) == 4
    time.sleep(0.3)
    for sub in (a, b):
        got = []
        for _, pkt in sub.events:
            r = harness.XdrReader(pkt.payload)
            cid = r.i32()
            name = r.string()
            r.opaque_fixed(16)                  # uuid
            got.append((pkt.proc, cid, name, r.i32()))
        net_id = ids[(id(sub), PROC_NETWORK_REGISTER)]
        pool_id = ids[(id(sub), PROC_POOL_REGISTER)]
        # stopped (3), started (2)
        assert got == [
            (PROC_NETWORK_EVENT_LIFECYCLE, net_id, "default", 3),
            (PROC_NETWORK_EVENT_LIFECYCLE, net_id, "default", 2),
            (PROC_POOL_EVENT_LIFECYCLE, pool_id, "default-pool", 3),
            (PROC_POOL_EVENT_LIFECYCLE, pool_id, "default-pool", 2)]

    # each family deregisters with its own procedure and its own ids
    pkt = a.call(PROC_NETWORK_DEREGISTER, xdr_i32(ids[(id(a), 313)]))
    assert pkt.status == harness.STATUS_OK
    pkt = a.call(PROC_POOL_DEREGISTER, xdr_i32(ids[(id(a), 368)]))
    assert pkt.status == harness.STATUS_OK
    assert gw.event_counts() == (2, 2)
    b.close()
    assert wait_until(lambda: gw.event_counts() == (0, 0), 5.0)


def test_readonly_subscribers_use_the_readonly_pool(setup, raw_subscribers):
    lvd, gw, ctl = setup
    rw = raw_subscribers(port=gw.port)
    ro = RawClient(port=gw.port)
    try:
        ro.handshake(readonly=True)
        assert harness.raw_register_event(ro) == 0
        assert rw.register() == 0
        pools = sorted((p["readonly"], p["event_registrations"],
                        p["event_subscribers"])
                       for p in gw.status()["pools"])
        assert pools == [(False, 1, 1), (True, 1, 1)]
        rw.start()
        dom = ctl.lookupByName("test")
        dom.suspend()
        dom.resume()
        assert rw.wait_events(2, timeout=10) == 2
        want = [(0, "test", harness.DOMAIN_EVENT_SUSPENDED, 0),
                (0, "test", harness.DOMAIN_EVENT_RESUMED, 0)]
        assert rw.lifecycle() == want
        got = [harness.decode_lifecycle(ro.recv_packet(timeout=5).payload)
               for _ in range(2)]
        assert got == want
    finally:
        ro.close()


def test_deregister_unknown_callback_is_an_error(setup):
    lvd, gw, ctl = setup
    for port in (lvd.port, gw.port):
        with RawClient(port=port) as c:
            c.handshake()
            pkt = harness.raw_deregister_event(c, 99)
            assert pkt.status == harness.STATUS_ERROR
            err = harness.decode_error(pkt.payload)
            assert "99" in err["message"] and \
                "not registered" in err["message"], err
            assert [d["name"] for d in c.list_all_domains()] == ["test"]


def test_duplicate_registration_refused_like_libvirtd(setup):
    """One session registering the same (event, filter) twice: libvirtd
    refuses the second ("event callback already tracked"); through the
    gateway the answer must be the same, or one session could hold any
    number of copies of every event."""
    lvd, gw, ctl = setup
    answers = {}
    for where, port in (("direct", lvd.port), ("virtmux", gw.port)):
        with RawClient(port=port) as c:
            c.handshake()
            harness.raw_register_event(c)
            pkt = c.call(harness.PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
                         harness.xdr_event_register_args(0))
            if pkt.status == harness.STATUS_OK:
                answers[where] = ("registered again as callback %d"
                                  % harness.XdrReader(pkt.payload).i32())
            else:
                err = harness.decode_error(pkt.payload)
                answers[where] = (err["code"], err["message"])
    assert answers["direct"] == (VIR_ERR_INVALID_ARG, "invalid argument: "
                                 "event callback already tracked")
    assert answers["virtmux"] == answers["direct"]
