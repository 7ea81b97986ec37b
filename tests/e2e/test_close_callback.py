"""Close callbacks: once an upstream has been unreachable for
pool.give_up_s, the sessions homed on the lost connection are told
(CONNECT_EVENT_CONNECTION_CLOSED, reason VIR_CONNECT_CLOSE_REASON_EOF) if
they registered a close callback, and closed either way."""

import time

import libvirt
import pytest

import harness
from harness import RawClient, call_with_timeout, virsh, wait_until

GIVE_UP_S = 2
CLOSE_REASON_EOF = 1           # VIR_CONNECT_CLOSE_REASON_EOF


def give_up_config(lvd, give_up_s=GIVE_UP_S):
    return harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri, give_up_s=give_up_s)],
        default_upstream="hv1", admin=True)


def raw_session(gw, close_callback=None):
    """A raw session; close_callback: None (never registered), True
    (registered) or False (registered, then unregistered)."""
    c = RawClient(port=gw.port)
    c.handshake()
    if close_callback is not None:
        pkt = c.call(harness.PROC_CONNECT_REGISTER_CLOSE_CALLBACK)
        assert pkt.status == harness.STATUS_OK and pkt.payload == b""
    if close_callback is False:
        pkt = c.call(harness.PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK)
        assert pkt.status == harness.STATUS_OK
    return c


@pytest.fixture
def plain_connections():
    conns = []
    yield conns
    for c in conns:
        t, _ = harness.start_call(c.close)
        t.join(5)


def test_close_callback_when_upstream_gone_for_good(
        libvirtd, gateway, event_clients, plain_connections):
    lvd = libvirtd
    gw = gateway(give_up_config(lvd))

    # a libvirt-python client with an event loop and a close callback (and
    # an event subscription, which must not keep its session alive)
    told = event_clients()
    opened = told.open(gw.uri(), n=1, register=True, close_callback=True)
    assert opened["errors"] == []
    # a libvirt-python client without event loop or close callback
    plain = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    plain_connections.append(plain)
    plain_dom = plain.lookupByName("test")
    assert plain_dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    # the same on the wire
    raw_told = raw_session(gw, close_callback=True)
    raw_untold = raw_session(gw)
    raw_unregistered = raw_session(gw, close_callback=False)
    raws = (raw_told, raw_untold, raw_unregistered)
    try:
        assert gw.status()["sessions"] == 5

        t_kill = time.monotonic()
        lvd.kill9()

        # the close callback fires with reason EOF, after give_up_s
        assert wait_until(lambda: told.events()["closed"][0], 10.0), \
            "close callback not called within 10 s"
        (t_cb, reason), = told.events()["closed"][0]
        assert reason == CLOSE_REASON_EOF
        after = t_cb - t_kill
        assert GIVE_UP_S - 0.5 <= after <= 6.0, \
            "close callback after %.2f s" % after

        # every raw session is closed; only the one that asked is told
        for c in raws:
            assert c.wait_closed(timeout=max(0.1, t_kill + 8.0
                                             - time.monotonic())), \
                "session still open 8 s after libvirtd died"
        closed_by = time.monotonic() - t_kill
        assert closed_by <= 8.0
        (msg,) = raw_told.drained
        assert (msg.prog, msg.vers, msg.type, msg.proc, msg.status) == (
            harness.REMOTE_PROGRAM, harness.REMOTE_VERSION,
            harness.TYPE_MESSAGE, harness.PROC_CONNECT_EVENT_CONNECTION_CLOSED,
            harness.STATUS_OK)
        assert msg.payload == harness.xdr_i32(CLOSE_REASON_EOF)
        assert raw_untold.drained == []
        assert raw_unregistered.drained == []

        # the client without a close callback finds out at its next call,
        # at once
        t0 = time.monotonic()
        with pytest.raises(libvirt.libvirtError):
            call_with_timeout(plain_dom.info, timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert plain.isAlive() == 0
        # and the python client that was told cannot call either
        (res,) = told.request(op="call")["call"]
        assert res[0] == "error" and res[1] < 2.0, res
        assert told.request(op="alive")["alive"] == [0]

        log = gw.log_text()
        assert "giving up: upstream hv1 unreachable for" in log
        assert log.count("upstream connection lost for good") == 5, log
        assert wait_until(lambda: gw.status()["sessions"] == 0, 5.0), \
            gw.status()
    finally:
        for c in raws:
            c.close()

    # libvirtd comes back: new connections through the gateway work
    lvd.start()
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=15)
    plain_connections.append(conn)
    assert conn.lookupByName("test").info()[0] == libvirt.VIR_DOMAIN_RUNNING
    r = virsh(gw.uri(), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
    with RawClient(port=gw.port) as c:
        c.handshake()
        assert [d["name"] for d in c.list_all_domains()] == ["test"]


def test_no_close_before_give_up(libvirtd, gateway, event_clients):
    """libvirtd back within give_up_s: nobody is told or closed, and the
    sessions (and their event subscriptions) work again."""
    lvd = libvirtd
    gw = gateway(give_up_config(lvd, give_up_s=5))
    ec = event_clients()
    assert ec.open(gw.uri(), n=2, register=True,
                   close_callback=True)["errors"] == []
    raw = raw_session(gw, close_callback=True)
    try:
        lvd.kill9()
        time.sleep(0.5)
        lvd.start()
        # the pool is connected again, well before give_up_s
        assert wait_until(lambda: gw.event_counts() == (1, 2), 10.0), \
            gw.status()
        time.sleep(5.5)             # past give_up_s counted from the kill
        assert ec.events()["closed"] == [[], []]
        assert "lost for good" not in gw.log_text()
        res = ec.request(op="call")["call"]
        assert [r[0] for r in res] == ["ok", "ok"], res
        assert [d["name"] for d in raw.list_all_domains()] == ["test"]
        assert [p for p in raw.messages
                if p.prog != harness.KEEPALIVE_PROGRAM] == []
        # events flow to the subscribers again
        ctl = call_with_timeout(libvirt.open, lvd.direct_uri, timeout=10)
        try:
            dom = ctl.lookupByName("test")
            dom.suspend()
            dom.resume()
        finally:
            ctl.close()
        assert ec.wait_counts(2, timeout=10) == [2, 2]
    finally:
        raw.close()
