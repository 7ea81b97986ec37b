"""SIGTERM / SIGINT drain, end to end.

A real libvirtd (test driver) behind a FaultRelay that holds chosen replies
back, so that a call stays in flight across the signal for as long as the
test wants; libvirt-python clients through the gateway. What must hold:

* the call in flight when the signal comes completes successfully;
* the listeners close at once (TCP refuses, the unix socket file is gone);
* a new call on a session that is still open gets a clear error;
* the process exits 0 with one summary line;
* libvirtd sees every gateway connection go (and stays up);
* at limits.drain_timeout_s a stuck call is cut off, and the exit is still 0;
* a second signal stops at once;
* event registrations are dropped upstream before CONNECT_CLOSE.
"""

import http.client
import os
import re
import signal
import tempfile
import time

import libvirt
import pytest

import harness
from faultkit import FaultRelay
from harness import RawClient, start_call, wait_until
from tap import Tap

PROC_CONNECT_GET_VERSION = 4
# summary + upstream goodbyes (GOODBYE_S in gateway.c) + start-up noise
SLACK = harness.scaled(1) * float(os.environ.get("VIRTMUX_TIMING_SLACK", "1.5"))


@pytest.fixture
def relay(libvirtd):
    r = FaultRelay(libvirtd.port)
    yield r
    r.release()
    r.stop()


def held_info(h):
    return h["type"] == harness.TYPE_REPLY and h["proc"] == harness.PROC_DOMAIN_GET_INFO


def config(upstream_uri, drain_timeout_s=None, unix_path=None):
    listeners = [{"name": "tcp", "address": "127.0.0.1:%d" % harness.free_port(),
                  "auth": "none"}]
    if unix_path:
        listeners.append({"name": "local", "unix": unix_path, "auth": "none"})
    limits = None if drain_timeout_s is None else {"drain_timeout_s": drain_timeout_s}
    return harness.make_config([harness.upstream_entry("hv1", upstream_uri)],
                               default_upstream="hv1", listeners=listeners,
                               limits=limits, admin=True)


def wait_exit(gw, timeout):
    """The exit code, recorded so the fixture knows we stopped it."""
    try:
        rc = gw.proc.wait(timeout=timeout)
    except Exception:
        pytest.fail("virtmux still running %.0f s after the signal\n%s"
                    % (timeout, gw.log_tail()))
    gw.returncode = rc
    return rc


def summary(gw):
    m = re.search(r"drained in [0-9.]+ s: (\d+) sessions closed, (\d+) calls completed, "
                  r"(\d+) calls cut off", gw.log_text())
    assert m, "no summary line\n" + gw.log_tail()
    return tuple(int(x) for x in m.groups())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_finishes_call_in_flight(libvirtd, relay, gateway, sig):
    sockdir = tempfile.mkdtemp(prefix="virtmux-drain-")
    unix_path = os.path.join(sockdir, "gw.sock")
    gw = gateway(config(relay.uri(), unix_path=unix_path))
    busy = harness.call_with_timeout(libvirt.open, gw.uri(), timeout=20)
    idle = harness.call_with_timeout(libvirt.open, gw.unix_uri(), timeout=20)
    dom = busy.lookupByName("test")
    expected = dom.info()[:4]
    relay.hold(held_info)
    t, res = start_call(dom.info)
    assert wait_until(lambda: relay.held() == 1, timeout=harness.scaled(5))

    os.kill(gw.proc.pid, sig)
    # nobody new comes in: TCP refused, the socket file gone
    assert wait_until(lambda: not harness.tcp_accepts(gw.host, gw.port),
                      timeout=harness.scaled(5)), "TCP listener still accepting"
    assert not os.path.exists(unix_path), "unix socket file left behind"
    with pytest.raises(libvirt.libvirtError):
        libvirt.open(gw.uri())
    # a new call on a session still open (its other call is in flight) is refused clearly
    with pytest.raises(libvirt.libvirtError) as e:
        harness.call_with_timeout(busy.getVersion, timeout=harness.scaled(5))
    assert "virtmux is shutting down" in str(e.value)
    assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    time.sleep(0.3)
    assert gw.running(), "the gateway did not wait for the call in flight"
    assert not res.end, "the held call ended early: %r" % (res.error,)

    relay.release()
    t.join(harness.scaled(10))
    assert not t.is_alive()
    assert res.error is None, res.error
    assert res.value[:4] == expected
    assert wait_exit(gw, 5 * SLACK + 5) == 0, gw.log_tail()
    assert summary(gw) == (2, 1, 0)
    # libvirtd lost every gateway connection, politely, and is still up
    assert wait_until(lambda: libvirtd.nclients() == 0, timeout=harness.scaled(5)), \
        libvirtd.clients()
    assert libvirtd.running()
    for c in (busy, idle):
        try:
            c.close()
        except libvirt.libvirtError:
            pass
    os.rmdir(sockdir)


def test_drain_timeout_cuts_stuck_call(libvirtd, relay, gateway):
    gw = gateway(config(relay.uri(), drain_timeout_s=1))
    conn = harness.call_with_timeout(libvirt.open, gw.uri(), timeout=20)
    dom = conn.lookupByName("test")
    relay.hold(held_info)
    t, res = start_call(dom.info)
    assert wait_until(lambda: relay.held() == 1, timeout=harness.scaled(5))
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    # drain_timeout_s, then at most GOODBYE_S (5 s) for the link whose call is stuck
    assert wait_exit(gw, 1 + 5 + 5 * SLACK) == 0, gw.log_tail()
    took = time.monotonic() - t0
    assert took >= 0.9, "exited before the drain timeout (%.1f s)" % took
    t.join(harness.scaled(5))
    assert not t.is_alive()
    assert isinstance(res.error, libvirt.libvirtError), res.value
    assert summary(gw) == (1, 0, 1)
    assert "drain timeout (1 s): closing 1 sessions, cutting off 1 calls" in gw.log_text()
    relay.release()
    assert wait_until(lambda: libvirtd.nclients() == 0, timeout=harness.scaled(5))
    assert libvirtd.running()


def test_second_signal_stops_now(libvirtd, relay, gateway):
    gw = gateway(config(relay.uri(), drain_timeout_s=600))
    conn = harness.call_with_timeout(libvirt.open, gw.uri(), timeout=20)
    dom = conn.lookupByName("test")
    relay.hold(held_info)
    t, res = start_call(dom.info)
    assert wait_until(lambda: relay.held() == 1, timeout=harness.scaled(5))
    host, port = harness.split_address(gw.config["admin"]["address"])

    def healthz():
        c = http.client.HTTPConnection(host, port, timeout=harness.scaled(5))
        try:
            c.request("GET", "/healthz")
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()
    assert healthz() == (200, b"ok\n")
    gw.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: "draining: listeners closed" in gw.log_text(),
                      timeout=harness.scaled(5))
    assert gw.running()
    # load balancers are told to send new clients elsewhere
    assert healthz() == (503, b"draining\n")
    # no reload in the middle of a drain
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload ignored: virtmux is draining" in gw.log_text(),
                      timeout=harness.scaled(5))
    gw.proc.send_signal(signal.SIGTERM)
    assert wait_exit(gw, 3 * SLACK) == 0, gw.log_tail()
    assert "during the drain: stopping now" in gw.log_text()
    t.join(harness.scaled(5))
    assert isinstance(res.error, libvirt.libvirtError)


def test_drain_deregisters_events_then_closes(libvirtd, gateway):
    """A subscriber's registration is dropped upstream (and answered) before
    the gateway's upstream connection says CONNECT_CLOSE."""
    tap = Tap(libvirtd.port)
    try:
        gw = gateway(config(tap.uri()))
        with RawClient(port=gw.port) as c:
            c.handshake()
            harness.raw_register_event(c)
            mark = tap.mark()
            gw.proc.send_signal(signal.SIGTERM)
            assert c.wait_closed(timeout=harness.scaled(5)), "session not closed"
        assert wait_exit(gw, 5 * SLACK) == 0, gw.log_tail()
        calls = tap.calls(mark)
        procs = [f.proc for f in calls if f.prog == harness.REMOTE_PROGRAM]
        assert harness.PROC_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY in procs, procs
        assert harness.PROC_CONNECT_CLOSE in procs, procs
        assert procs.index(harness.PROC_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY) < \
            procs.index(harness.PROC_CONNECT_CLOSE)
        # libvirtd answered both before the gateway let go of its connection
        answered = [f.proc for f in tap.reply_frames() if f.type == harness.TYPE_REPLY]
        assert harness.PROC_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY in answered, answered
        assert harness.PROC_CONNECT_CLOSE in answered, answered
        assert "closed: said goodbye with CONNECT_CLOSE" in gw.log_text()
        assert summary(gw) == (1, 0, 0)
        assert wait_until(lambda: libvirtd.nclients() == 0, timeout=harness.scaled(5))
        assert libvirtd.running()
    finally:
        tap.stop()
