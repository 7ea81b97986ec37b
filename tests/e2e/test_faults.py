"""Faults on either side of the gateway, each followed by a check that the
gateway's /status totals return to rest.

libvirtd side: SIGKILL under 64 clients, SIGSTOP (the upstream keepalive
must declare the link dead), a connection cut in the middle of a reply
(FaultRelay between the gateway and libvirtd). Client side: a client that
vanishes in the middle of a frame, of a call and of a stream, while a
well-behaved client (faultkit.Probe, its own process) keeps calling.

Timing bounds are the nominal ones times SLACK (VIRTMUX_TIMING_SLACK,
default 1.5): two shared cores run the gateway, libvirtd, 64 client threads
and other test suites at once.
"""

import gc
import os
import threading
import time

import libvirt
import pytest

import faultkit
import harness
from faultkit import FaultRelay, Probe, wait_rest
from harness import (RawClient, build_packet, call_with_timeout, start_call,
                     wait_until)

# slack on timing bounds; a sanitizer build (VIRTMUX_TIME_SCALE) stretches it further
SLACK = float(os.environ.get("VIRTMUX_TIMING_SLACK", "1.5")) * harness.scaled(1)
PROC_NODE_GET_INFO = 6
PROC_DOMAIN_SCREENSHOT = 211


def gateway_config(upstream_uri, pool, limits=None, keepalive=None):
    return harness.make_config(
        [harness.upstream_entry("hv1", upstream_uri, **pool)],
        default_upstream="hv1", limits=limits, keepalive=keepalive,
        admin=True)


def close_all(conns, *holders):
    """Close libvirt connections. A virDomain keeps its connection (and
    the socket) alive, so every list or Caller holding one is emptied
    first."""
    for h in holders:
        if isinstance(h, list):
            for x in h:
                if isinstance(x, Caller):
                    x.dom = None
            del h[:]
    gc.collect()
    for c in conns:
        t, _ = start_call(c.close)
        t.join(5)
    del conns[:]


def open_doms(uri, n):
    conns = [call_with_timeout(libvirt.open, uri, timeout=20)
             for _ in range(n)]
    return conns, [c.lookupByName("test") for c in conns]


class Caller:
    """A thread calling dom.info() in a loop and recording every call as
    (start, end, error or None). Phases: run until `stop`; after an error,
    wait for `resume` (if given) before calling again."""

    def __init__(self, dom, expected, stop, resume=None, pause_s=0.0):
        self.dom, self.expected = dom, expected
        self.stop, self.resume = stop, resume
        self.pause_s = pause_s
        self.calls = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            err = None
            try:
                if self.dom.info()[:4] != self.expected:
                    err = "wrong answer"
            except libvirt.libvirtError as e:
                # (code, text): the exception's traceback would keep the
                # domain, and so the connection, alive
                err = (e.get_error_code(), str(e))
            self.calls.append((t0, time.monotonic(), err))
            if err is not None:
                if self.resume is not None:
                    self.resume.wait(60)
                time.sleep(self.pause_s)

    def outstanding_at(self, t):
        """The call that was outstanding at t, or None."""
        for c in self.calls:
            if c[0] <= t < c[1]:
                return c
        return None

    def first_ok_after(self, t):
        for c in self.calls:
            if c[0] >= t and c[2] is None:
                return c
        return None


def join_all(callers, bound):
    deadline = time.monotonic() + bound
    for c in callers:
        c.thread.join(max(0.1, deadline - time.monotonic()))
    return [i for i, c in enumerate(callers) if c.thread.is_alive()]


# --------------------------------------------------------------------------
# libvirtd killed under load
# --------------------------------------------------------------------------

NCLIENTS = 64
# reconnect_hold_ms 0: calls waiting in the queue fail with the link instead
# of waiting for libvirtd to come back (test_maintenance.py tests the hold)
KILL_POOL = {"max_connections": 4, "max_inflight": 4, "idle_timeout_s": 60,
             "reconnect_hold_ms": 0}
KILL_QUEUE_MS = 3000


def test_sigkill_under_64_clients(libvirtd, gateway):
    """64 connections loop on DOMAIN_GET_INFO; libvirtd is frozen for 0.5 s
    (less than queue_timeout_ms), then SIGKILLed. Every call outstanding at
    the kill (16 on the wire, 48 in the gateway's queue) fails within 1 s;
    after a restart on the same port every connection's calls succeed again
    within 2 s (the reconnect backoff is at most 2 s)."""
    lvd = libvirtd
    gw = gateway(gateway_config(lvd.direct_uri, KILL_POOL,
                                limits={"queue_timeout_ms": KILL_QUEUE_MS}))
    conns, doms = open_doms(gw.uri(), NCLIENTS)
    stop = threading.Event()
    callers = []
    try:
        expected = doms[0].info()[:4]
        # after an error each caller goes on calling every 0.1 s
        callers += [Caller(d, expected, stop, pause_s=0.1) for d in doms]
        for c in callers:
            c.thread.start()
        time.sleep(1.5)
        # freeze first so that every caller is certainly waiting (16 calls
        # on the wire, 48 in the gateway's queue) when the kill lands
        lvd.sigstop()
        time.sleep(0.5)
        kill_at = time.monotonic()
        lvd.kill9()
        time.sleep(1.0 * SLACK + 0.5)
        down_until = time.monotonic()
        lvd.start()     # returns once libvirtd accepts: calls may work sooner
        restart_at = time.monotonic()
        assert wait_until(lambda: all(c.first_ok_after(restart_at)
                                      for c in callers), 2.0 * SLACK + 5)
        time.sleep(0.3)
        stop.set()
        hung = join_all(callers, KILL_QUEUE_MS / 1000.0 + 10)
        assert not hung, "callers %s never finished" % hung

        in_flight = [c.outstanding_at(kill_at) for c in callers]
        in_flight = [x for x in in_flight if x is not None]
        late = [x[1] - kill_at for x in in_flight]
        errs = [x[2] for x in in_flight]
        recovered = [c.first_ok_after(restart_at)[1] - restart_at
                     for c in callers]
        before = sum(1 for c in callers for x in c.calls
                     if x[1] < kill_at and x[2] is None)
        wrong = [x for c in callers for x in c.calls if x[2] == "wrong answer"]
        between = [x for c in callers for x in c.calls
                   if kill_at <= x[0] and x[1] < down_until]
        print("%d calls before the kill; %d outstanding at the kill, errors "
              "after <= %.3f s; %d calls failed while libvirtd was down; "
              "recovered <= %.2f s after restart"
              % (before, len(in_flight), max(late), len(between),
                 max(recovered)))
        assert not wrong, wrong[:3]
        assert before >= NCLIENTS, "the load never got going"
        assert len(in_flight) == NCLIENTS, len(in_flight)
        assert all(e is not None and e[0] == harness.VIR_ERR_INTERNAL_ERROR
                   for e in errs), set(errs)
        assert max(late) <= 1.0 * SLACK, sorted(late)[-5:]
        assert max(recovered) <= 2.0 * SLACK, sorted(recovered)[-5:]
        # calls made between kill and restart failed too, never hung
        assert len(between) >= NCLIENTS, len(between)
        assert all(x[2] is not None for x in between), \
            [x for x in between if x[2] is None][:3]
        slow = [x for x in between
                if x[1] - x[0] > KILL_QUEUE_MS / 1000.0 * SLACK]
        assert not slow, slow[:3]
    finally:
        stop.set()
        join_all(callers, 10)
        close_all(conns, doms, callers)
    bad, totals = wait_rest(gw, sessions=0, max_links=4)
    assert not bad, (bad, totals)


# --------------------------------------------------------------------------
# libvirtd frozen
# --------------------------------------------------------------------------

KA_INTERVAL, KA_COUNT = 1, 2
# keepalive.c ticks every interval and compares whole seconds: the link is
# declared dead at most interval*(count+2) after libvirtd's last byte
KA_BOUND = KA_INTERVAL * (KA_COUNT + 2)
STOP_QUEUE_MS = 1000


def test_sigstop_keepalive_declares_link_dead(libvirtd, gateway):
    """libvirtd frozen under 8 looping clients: calls on the wire fail when
    the upstream keepalive declares the link dead, calls queued behind them
    time out after queue_timeout_ms, nothing hangs; after SIGCONT the same
    connections work again."""
    lvd = libvirtd
    gw = gateway(gateway_config(
        lvd.direct_uri, {"max_connections": 2, "max_inflight": 2,
                         "idle_timeout_s": 60},
        limits={"queue_timeout_ms": STOP_QUEUE_MS},
        keepalive={"interval_s": KA_INTERVAL, "count": KA_COUNT}))
    conns, doms = open_doms(gw.uri(), 8)
    stop = threading.Event()
    callers = []
    try:
        expected = doms[0].info()[:4]
        callers += [Caller(d, expected, stop, pause_s=0.05) for d in doms]
        for c in callers:
            c.thread.start()
        time.sleep(1.0)
        nready = sum(1 for p in gw.status()["pools"] for lk in p["links"]
                     if lk["state"] == "ready")
        assert nready >= 1
        log_mark = len(gw.log_text())
        stop_at = time.monotonic()
        lvd.sigstop()
        try:
            # every link that was READY is declared dead
            dead = wait_until(
                lambda: gw.log_text()[log_mark:].count(
                    "keepalive timeout: libvirtd stopped answering")
                >= nready, KA_BOUND * SLACK + 2, interval=0.1)
            # ... and so is one the pool opened meanwhile (it may have become READY just
            # before the stop, after nready was counted)
            def states_now():
                return [lk["state"] for p in gw.status()["pools"] for lk in p["links"]]
            wait_until(lambda: "ready" not in states_now(), KA_BOUND * SLACK + 2, interval=0.1)
            dead_at = time.monotonic() - stop_at
            states = states_now()
            time.sleep(2.0)     # calls keep failing while libvirtd sleeps
            cont_at = time.monotonic()
        finally:
            lvd.sigcont()
        assert dead, gw.log_text()[log_mark:][-3000:]
        assert "ready" not in states, states
        assert wait_until(lambda: all(c.first_ok_after(cont_at)
                                      for c in callers), 5.0 * SLACK + 5)
        stop.set()
        hung = join_all(callers, KA_BOUND * SLACK + 10)
        assert not hung, hung

        # SIGSTOP takes effect a moment after the signal is sent: count the
        # calls still outstanding 0.3 s later
        on_wire = [c.outstanding_at(stop_at + 0.3) for c in callers]
        on_wire = [x for x in on_wire if x is not None]
        # (from the same 0.3 s on: a call made just after the signal may still be
        # answered, or share a call that is, before libvirtd actually stops)
        while_stopped = [x for c in callers for x in c.calls
                         if stop_at + 0.3 <= x[0] and x[1] <= cont_at]
        recovered = [c.first_ok_after(cont_at)[1] - cont_at for c in callers]
        print("%d links declared dead %.2f s after SIGSTOP (bound %d s); %d "
              "calls failed while stopped; recovered <= %.2f s after SIGCONT"
              % (nready, dead_at, KA_BOUND, len(while_stopped),
                 max(recovered)))
        assert on_wire, "no call was outstanding at SIGSTOP"
        for start, end, err in on_wire:
            assert err is not None and err != "wrong answer", err
            assert end - stop_at <= KA_BOUND * SLACK, end - stop_at
        assert while_stopped, "no call was made while libvirtd slept"
        for start, end, err in while_stopped:
            assert err is not None and err != "wrong answer", err
            assert err[0] in (
                harness.VIR_ERR_INTERNAL_ERROR,
                harness.VIR_ERR_OPERATION_TIMEOUT), err
            assert end - start <= KA_BOUND * SLACK, (end - start, err)
        assert dead_at <= KA_BOUND * SLACK + 0.5, dead_at
    finally:
        stop.set()
        lvd.sigcont()
        join_all(callers, 10)
        close_all(conns, doms, callers)
    bad, totals = wait_rest(gw, sessions=0, max_links=2)
    assert not bad, (bad, totals)


# --------------------------------------------------------------------------
# the upstream connection cut in the middle of a reply
# --------------------------------------------------------------------------

@pytest.fixture
def relay(libvirtd):
    r = FaultRelay(libvirtd.port)
    yield r
    r.stop()


def is_reply(proc):
    return lambda h: h["type"] == harness.TYPE_REPLY and h["proc"] == proc


@pytest.mark.parametrize("keep", [2, 14, None],
                         ids=["in-length-word", "in-header", "half"])
def test_upstream_cut_mid_reply(libvirtd, relay, gateway, keep):
    """The relay forwards part of a DOMAIN_GET_INFO reply and closes both
    sockets: the caller gets an error at once, not a hang, and its next
    call (same connection) works."""
    gw = gateway(gateway_config(relay.uri(), {"max_connections": 2,
                                              "max_inflight": 4}))
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=20)
    dom = res = None
    try:
        dom = conn.lookupByName("test")
        expected = dom.info()[:4]
        relay.cut(is_reply(harness.PROC_DOMAIN_GET_INFO), keep)
        t, res = start_call(dom.info)
        t.join(1.0 * SLACK + 2)
        assert not t.is_alive(), "the call hangs after the cut"
        assert relay.cuts == 1
        assert isinstance(res.error, libvirt.libvirtError), res.value
        assert res.error.get_error_code() == harness.VIR_ERR_INTERNAL_ERROR
        assert res.elapsed <= 1.0 * SLACK, res.elapsed
        assert call_with_timeout(dom.info, timeout=10)[:4] == expected
        assert relay.nconns >= 2            # it reconnected through the relay
    finally:
        # the error's traceback holds dom.info, which holds the connection
        del dom, res
        close_all([conn])
    bad, totals = wait_rest(gw, sessions=0, max_links=2)
    assert not bad, (bad, totals)


# --------------------------------------------------------------------------
# clients vanishing, with a well-behaved client calling throughout
# --------------------------------------------------------------------------

@pytest.fixture
def bystander(libvirtd, relay, gateway):
    """Gateway through the relay, and a Probe calling every 10 ms."""
    gw = gateway(gateway_config(relay.uri(), {"max_connections": 1,
                                              "max_inflight": 4}))
    probe = Probe(gw.uri(), interval=0.01)
    try:
        yield gw, probe
    finally:
        probe.close()


def assert_rest_and_probe_fine(gw, probe, samples, victims=0):
    probe.pause()
    try:
        bad, totals = wait_rest(gw, sessions=1 + victims, max_links=1)
        assert not bad, (bad, totals)
    finally:
        probe.resume()
    samples = samples + probe.take()
    n, p50, p99, worst, errors = faultkit.latency_summary(samples)
    assert not errors, errors[:5]
    return n, p50, p99, worst


def domain_info_packet(dom, serial):
    return build_packet(harness.REMOTE_PROGRAM, harness.REMOTE_VERSION,
                        harness.PROC_DOMAIN_GET_INFO, harness.TYPE_CALL,
                        serial, payload=harness.xdr_domain(
                            dom["name"], dom["uuid"], dom["id"]))


def test_client_vanishes_mid_frame(bystander):
    gw, probe = bystander
    probe.take()
    cases = 0
    for opened in (False, True):
        for cut in (2, 4, 20, 28, 40):
            c = RawClient(port=gw.port)
            if opened:
                c.handshake()
                dom = c.lookup_domain("test")
            else:
                dom = {"name": "test", "uuid": b"\0" * 16, "id": 1}
            pkt = domain_info_packet(dom, 99)
            assert cut < len(pkt)
            c.send(pkt[:cut])
            time.sleep(0.05)
            c.close()
            cases += 1
    n, p50, p99, worst = assert_rest_and_probe_fine(gw, probe, [])
    print("%d partial frames; bystander %d calls, p99 %.1f ms" % (cases, n,
                                                                  p99))
    assert n > 0


def test_client_vanishes_mid_call(bystander, relay):
    """The victim's NODE_GET_INFO reply is held at the relay: the call is
    certainly in flight in the gateway when the victim hangs up. The late
    reply is swallowed; the shared link goes on serving the bystander."""
    gw, probe = bystander
    probe.take()
    relay.hold(is_reply(PROC_NODE_GET_INFO))
    victim = RawClient(port=gw.port)
    try:
        victim.handshake()
        victim.send_packet(harness.REMOTE_PROGRAM, 1, PROC_NODE_GET_INFO,
                           harness.TYPE_CALL, 42)
        assert wait_until(lambda: relay.held() == 1, 5.0)
        assert gw.status()["totals"]["sessions"] == 2
    finally:
        victim.close()
    assert wait_until(lambda: gw.status()["totals"]["sessions"] == 1, 5.0)
    probe.pause()
    try:
        totals = gw.status()["totals"]
        # the victim's call is still on the wire, owned by nobody
        assert totals["inflight"] == 1, totals
        assert totals["calls_outstanding"] == 0, totals
    finally:
        probe.resume()
    time.sleep(0.3)                       # the bystander calls meanwhile
    during = probe.take()
    assert during and not [s for s in during if s[2]], during[-3:]
    assert relay.release() == 1
    n, p50, p99, worst = assert_rest_and_probe_fine(gw, probe, during)
    print("bystander %d calls while a swallowed call was held, p99 %.1f ms"
          % (n, p99))


def test_client_vanishes_mid_stream(bystander, relay, libvirtd):
    """A raw screenshot: the reply and the first data packet reach the
    victim, the rest is held at the relay; the victim hangs up. The stream
    and its dedicated upstream connection go away."""
    gw, probe = bystander
    base = libvirtd.nclients()
    probe.take()
    passed = []

    def rest_of_stream(h):
        if h["type"] != harness.TYPE_STREAM or h["proc"] != \
                PROC_DOMAIN_SCREENSHOT:
            return False
        if not passed:
            passed.append(h)
            return False
        return True
    relay.hold(rest_of_stream)
    victim = RawClient(port=gw.port)
    try:
        victim.handshake()
        dom = victim.lookup_domain("test")
        serial = victim.next_serial()
        victim.send_packet(harness.REMOTE_PROGRAM, 1, PROC_DOMAIN_SCREENSHOT,
                           harness.TYPE_CALL, serial,
                           payload=harness.xdr_domain(dom["name"],
                                                      dom["uuid"], dom["id"])
                           + harness.xdr_u32(0) + harness.xdr_u32(0))
        reply = victim.recv_packet(timeout=5)
        assert (reply.type, reply.serial, reply.status) == \
            (harness.TYPE_REPLY, serial, harness.STATUS_OK), reply
        data = victim.recv_packet(timeout=5)
        assert (data.type, data.serial, data.status) == \
            (harness.TYPE_STREAM, serial, harness.STATUS_CONTINUE), data
        assert len(data.payload) > 0
        assert wait_until(lambda: relay.held() >= 1, 5.0)
        assert gw.status()["totals"]["streams"] == 1
        assert libvirtd.nclients() == base + 1
    finally:
        victim.close()
    assert wait_until(lambda: gw.status()["totals"]["streams"] == 0, 5.0), \
        gw.status()["totals"]
    relay.release()
    assert wait_until(lambda: libvirtd.nclients() == base, 10.0), \
        (libvirtd.nclients(), base)
    n, p50, p99, worst = assert_rest_and_probe_fine(gw, probe, [])
    print("stream of %d bytes abandoned; bystander %d calls, p99 %.1f ms"
          % (len(data.payload), n, p99))
