"""Event fan-out: one upstream registration per (event, filter) and pool,
many subscribers, each with callback ids of its own.

Subscribers are real libvirt-python connections with the default event loop
(harness.EventClients, in a child process) and, where the wire matters
(callback ids, a client that stops reading), raw-protocol sockets. Events
come from the test driver: suspend/resume of the domain "test" by a
controller connected straight to libvirtd (it also keeps the test driver's
state alive for the whole test)."""

import re
import threading
import time

import libvirt
import pytest

import harness
from harness import (DOMAIN_EVENT_ID_LIFECYCLE, DOMAIN_EVENT_ID_REBOOT,
                     DOMAIN_EVENT_RESUMED, DOMAIN_EVENT_SUSPENDED,
                     RawClient, call_with_timeout, wait_until)

SUSPENDED, RESUMED = DOMAIN_EVENT_SUSPENDED, DOMAIN_EVENT_RESUMED
DOMAIN_EVENT_ID_RTC_CHANGE = 2
PROC_LIFECYCLE = harness.PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE

REGISTERED_RE = re.compile(
    r"event registration ([A-Z_]+): upstream callback (-?\d+)")
# the gateway's log names procedures; the checks below compare numbers
REGISTER_PROCS = {"CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY": 316,
                  "CONNECT_NETWORK_EVENT_REGISTER_ANY": 313,
                  "CONNECT_STORAGE_POOL_EVENT_REGISTER_ANY": 368}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def events_config(lvd, pool=None, **sections):
    return harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri, **(pool or {}))],
        default_upstream="hv1", admin=True, **sections)


@pytest.fixture
def controller(request):
    """controller(lvd) -> a libvirt connection straight to libvirtd, closed
    at teardown (bounded)."""
    conns = []

    def make(lvd):
        c = call_with_timeout(libvirt.open, lvd.direct_uri, timeout=10)
        conns.append(c)
        return c
    yield make
    for c in conns:
        t, _ = harness.start_call(c.close)
        t.join(5)


def flip(dom, rounds, pause=0.0, sent=None):
    """suspend + resume `rounds` times; returns (appends to) the list of
    time.monotonic() taken just before each call."""
    sent = [] if sent is None else sent
    for _ in range(rounds):
        sent.append(time.monotonic())
        dom.suspend()
        if pause:
            time.sleep(pause)
        sent.append(time.monotonic())
        dom.resume()
        if pause:
            time.sleep(pause)
    return sent


def flip_events(rounds, name="test"):
    return [[name, SUSPENDED, 0], [name, RESUMED, 0]] * rounds


def pools_with_events(gw):
    """[(pool name, read-only, registrations, subscribers)] of the pools
    that have any."""
    return [(p["name"], p["readonly"], p["event_registrations"],
             p["event_subscribers"])
            for p in gw.status()["pools"]
            if p["event_registrations"] or p["event_subscribers"]]


def upstream_registrations(gw):
    """[(register proc, upstream callback id)] in the order the gateway made
    them (its debug log)."""
    return [(REGISTER_PROCS[a], int(b)) for a, b in REGISTERED_RE.findall(gw.log_text())]


def quiet_upstream(gw, lvd, dom, rounds=10):
    """Bytes libvirtd sends to the gateway's connections while the domain is
    flipped `rounds` times: event traffic if a registration is still live
    upstream, about nothing otherwise (a keepalive PING is 28 bytes)."""
    before = harness.tcp_bytes_received(gw.proc.pid, lvd.port)
    flip(dom, rounds)
    time.sleep(0.5)
    return harness.tcp_bytes_received(gw.proc.pid, lvd.port) - before


def percentile(values, q):
    vals = sorted(values)
    k = max(0, min(len(vals) - 1, int(round(q / 100.0 * len(vals))) - 1))
    return vals[k]


def check_sequence(events, rounds, name="test"):
    """events: [[t, name, event, detail], ...] of one python subscriber."""
    assert [e[1:] for e in events] == flip_events(rounds, name)
    times = [e[0] for e in events]
    assert times == sorted(times)


# --------------------------------------------------------------------------
# 50 subscribers, one registration
# --------------------------------------------------------------------------

N_SUBSCRIBERS = 50
ROUNDS = 20


def test_fifty_subscribers_share_one_upstream_registration(
        libvirtd, gateway, controller, event_clients):
    lvd = libvirtd
    gw = gateway(events_config(lvd))
    dom = controller(lvd).lookupByName("test")

    ec = event_clients()
    opened = ec.open(gw.uri(), n=N_SUBSCRIBERS)
    assert opened["errors"] == []
    assert len(opened["ids"]) == N_SUBSCRIBERS and None not in opened["ids"]
    assert pools_with_events(gw) == [("test:///default", False, 1,
                                      N_SUBSCRIBERS)]
    regs = upstream_registrations(gw)
    assert len(regs) == 1 and regs[0][0] == 316, regs

    sent = flip(dom, ROUNDS // 2)
    # in the middle of the run: still one registration for everyone
    assert pools_with_events(gw) == [("test:///default", False, 1,
                                      N_SUBSCRIBERS)]
    flip(dom, ROUNDS - ROUNDS // 2, sent=sent)

    counts = ec.wait_counts(2 * ROUNDS, timeout=20)
    assert counts == [2 * ROUNDS] * N_SUBSCRIBERS, counts
    time.sleep(0.5)                    # anything extra would arrive now
    events = ec.events()["events"]
    delays = []
    for evs in events:
        check_sequence(evs, ROUNDS)
        delays.extend(e[0] - s for e, s in zip(evs, sent))
    assert min(delays) > 0
    assert max(delays) < 5.0, "slowest event took %.3f s" % max(delays)
    assert pools_with_events(gw) == [("test:///default", False, 1,
                                      N_SUBSCRIBERS)]
    assert len(upstream_registrations(gw)) == 1

    # everyone deregisters: the upstream registration goes, the sessions
    # stay, and libvirtd stops sending events to the gateway
    dereg = ec.request(op="deregister")["deregister"]
    assert dereg == ["ok"] * N_SUBSCRIBERS
    assert wait_until(lambda: gw.event_counts() == (0, 0), 5.0), gw.status()
    assert gw.status()["sessions"] == N_SUBSCRIBERS
    assert quiet_upstream(gw, lvd, dom) < 100
    assert ec.counts() == [2 * ROUNDS] * N_SUBSCRIBERS

    # and the next subscriber makes a new one
    again = ec.open(gw.uri(), n=1)
    assert again["errors"] == []
    assert gw.event_counts() == (1, 1)
    assert len(upstream_registrations(gw)) == 2
    flip(dom, 1)
    assert wait_until(lambda: ec.counts()[-1] == 2, 10.0)
    assert ec.events()["events"][-1][0][1:] == ["test", SUSPENDED, 0]
    assert ec.counts()[:-1] == [2 * ROUNDS] * N_SUBSCRIBERS


def test_raw_subscribers_get_their_own_callback_ids(
        libvirtd, gateway, controller, raw_subscribers):
    """The callbackID word of every event is the id this subscriber was
    given, whatever the order of its registrations and whatever libvirtd
    numbered the gateway's own registrations."""
    lvd = libvirtd
    gw = gateway(events_config(lvd))
    ctl = controller(lvd)
    dom = ctl.lookupByName("test")

    # a direct subscriber takes libvirtd's first callback ids
    d = raw_subscribers(port=lvd.port)
    d_reboot = d.register(DOMAIN_EVENT_ID_REBOOT)
    d_life = d.register(DOMAIN_EVENT_ID_LIFECYCLE)
    assert (d_reboot, d_life) == (0, 1)

    a = raw_subscribers(port=gw.port)
    b = raw_subscribers(port=gw.port)
    c = raw_subscribers(port=gw.port)
    test_dom = c.client.lookup_domain("test")
    a_life = a.register(DOMAIN_EVENT_ID_LIFECYCLE)
    b_reboot = b.register(DOMAIN_EVENT_ID_REBOOT)
    b_life = b.register(DOMAIN_EVENT_ID_LIFECYCLE)
    c_reboot = c.register(DOMAIN_EVENT_ID_REBOOT)
    c_rtc = c.register(DOMAIN_EVENT_ID_RTC_CHANGE)
    c_life = c.register(DOMAIN_EVENT_ID_LIFECYCLE, dom=test_dom)  # filtered
    assert (a_life, b_reboot, b_life, c_reboot, c_rtc, c_life) == \
        (0, 0, 1, 0, 1, 2)

    # four distinct (event, filter) keys, six subscribers
    assert pools_with_events(gw) == [("test:///default", False, 4, 6)]
    regs = upstream_registrations(gw)
    assert [p for p, _ in regs] == [316] * 4
    up_ids = [u for _, u in regs]
    assert len(set(up_ids)) == 4
    # libvirtd numbered them after the direct subscriber's: the ids the
    # subscribers see are not libvirtd's
    assert min(up_ids) >= 2
    for sub in (d, a, b, c):
        sub.start()

    flip(dom, 3)
    # a domain the filtered registration must not see
    other = ctl.defineXML("<domain type='test'><name>other</name>"
                          "<memory>65536</memory><os><type>hvm</type></os>"
                          "</domain>")
    other.undefine()

    test_events = [(SUSPENDED, 0), (RESUMED, 0)] * 3
    other_events = [("other", 0, 0), ("other", 1, 0)]   # defined, undefined
    for sub, cid, want_other in ((d, d_life, True), (a, a_life, True),
                                 (b, b_life, True), (c, c_life, False)):
        n = len(test_events) + (2 if want_other else 0)
        assert sub.wait_events(n, timeout=10, proc=PROC_LIFECYCLE) == n
    time.sleep(0.3)
    for sub, cid, want_other in ((d, d_life, True), (a, a_life, True),
                                 (b, b_life, True), (c, c_life, False)):
        got = sub.lifecycle()
        assert {g[0] for g in got} == {cid}, got
        assert [(g[2], g[3]) for g in got if g[1] == "test"] == test_events
        assert [g[1:] for g in got if g[1] != "test"] == \
            (other_events if want_other else [])
        # suspend/resume/define/undefine raise no reboot or RTC events
        assert all(p.proc == PROC_LIFECYCLE for _, p in sub.events)

    # ids are per session: b cannot deregister c's id 2, a can't use b's 1
    for sub, foreign in ((b, 2), (a, 1)):
        pkt = sub.deregister(foreign)
        assert pkt.status == harness.STATUS_ERROR
        err = harness.decode_error(pkt.payload)
        assert "not registered" in err["message"], err
    assert pools_with_events(gw) == [("test:///default", False, 4, 6)]

    # b leaves the lifecycle registration a still holds; a leaves it too
    assert b.deregister(b_life).status == harness.STATUS_OK
    assert gw.event_counts() == (4, 5)
    assert a.deregister(a_life).status == harness.STATUS_OK
    assert gw.event_counts() == (3, 4)
    # deregistering twice is an error, not a second decrement
    assert a.deregister(a_life).status == harness.STATUS_ERROR
    assert gw.event_counts() == (3, 4)

    before = {id(s): len(s.lifecycle()) for s in (a, b, c)}
    flip(dom, 1)
    assert c.wait_events(len(test_events) + 2, timeout=10,
                         proc=PROC_LIFECYCLE)
    time.sleep(0.3)
    assert len(a.lifecycle()) == before[id(a)]
    assert len(b.lifecycle()) == before[id(b)]
    assert c.lifecycle()[-2:] == [(c_life, "test", SUSPENDED, 0),
                                  (c_life, "test", RESUMED, 0)]

    # c vanishes without deregistering: its three subscriptions go; only
    # b's reboot subscription remains
    c.close()
    assert wait_until(lambda: gw.event_counts() == (1, 1), 5.0), \
        gw.status()
    b.close()
    assert wait_until(lambda: gw.event_counts() == (0, 0), 5.0), \
        gw.status()
    assert quiet_upstream(gw, lvd, dom) < 100


# --------------------------------------------------------------------------
# subscribers that come and go
# --------------------------------------------------------------------------

CHURN_SECONDS = 6.0


class RawChurner:
    """Raw subscribers in a loop, leaving in four different ways."""

    def __init__(self, port, k):
        self.port = port
        self.k = k
        self.cycles = 0
        self.errors = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            mode = (self.cycles + self.k) % 4
            try:
                with RawClient(port=self.port) as c:
                    c.handshake()
                    args = harness.xdr_event_register_args(
                        DOMAIN_EVENT_ID_LIFECYCLE)
                    if mode == 0:
                        # send the registration and hang up before the
                        # answer arrives
                        c.send_packet(harness.REMOTE_PROGRAM, 1, 316,
                                      harness.TYPE_CALL, c.next_serial(),
                                      payload=args)
                    else:
                        cid = harness.raw_register_event(c)
                        if mode == 1:
                            # deregister properly
                            pkt = harness.raw_deregister_event(c, cid)
                            if pkt.status != harness.STATUS_OK:
                                raise AssertionError(
                                    harness.decode_error(pkt.payload))
                        elif mode == 2:
                            # a second event, then vanish
                            harness.raw_register_event(
                                c, DOMAIN_EVENT_ID_REBOOT)
                        else:
                            time.sleep(0.05)    # vanish holding events
            except Exception as e:
                if len(self.errors) < 5:
                    self.errors.append(repr(e))
            self.cycles += 1


def test_subscribers_come_and_go_while_events_flow(
        libvirtd, gateway, controller, event_clients, raw_subscribers):
    lvd = libvirtd
    gw = gateway(events_config(lvd))
    dom = controller(lvd).lookupByName("test")

    stable = event_clients()
    assert stable.open(gw.uri(), n=3)["errors"] == []
    steady = raw_subscribers(port=gw.port)
    steady_id = steady.register()
    steady.start()

    churn = event_clients()
    churners = [RawChurner(gw.port, k) for k in range(4)]
    stop = threading.Event()
    sent = []
    flip_error = []

    def flipper():
        try:
            while not stop.is_set():
                flip(dom, 1, sent=sent)
                time.sleep(0.005)
        except libvirt.libvirtError as e:
            flip_error.append(str(e))

    ft = threading.Thread(target=flipper, daemon=True)
    ft.start()
    for ch in churners:
        ch.thread.start()
    try:
        stats = churn.request(op="churn", uri=gw.uri(),
                              seconds=CHURN_SECONDS, threads=6, timeout=90)
    finally:
        for ch in churners:
            ch.stop.set()
        for ch in churners:
            ch.thread.join(10)
        stop.set()
        ft.join(10)
    assert not ft.is_alive() and flip_error == []
    assert stats["stuck"] == 0, stats
    assert stats["cycles"] >= 20, stats
    assert stats["events"] > 0, stats
    for ch in churners:
        assert not ch.thread.is_alive()
        assert ch.cycles >= 10
    assert gw.running()

    # the subscribers that stayed saw every event, in order, once
    rounds = len(sent) // 2
    assert rounds >= 50
    counts = stable.wait_counts(2 * rounds, timeout=30)
    assert counts == [2 * rounds] * 3, (counts, rounds)
    assert steady.wait_events(2 * rounds, timeout=10) == 2 * rounds
    time.sleep(0.5)
    for evs in stable.events()["events"]:
        check_sequence(evs, rounds)
    assert steady.lifecycle() == [(steady_id, "test", e, d)
                                  for _, e, d in flip_events(rounds)]

    # only the stayers are left, on one registration
    assert wait_until(lambda: pools_with_events(gw)
                      == [("test:///default", False, 1, 4)], 5.0), \
        gw.status()
    assert stable.request(op="deregister")["deregister"] == ["ok"] * 3
    steady.close()
    assert wait_until(lambda: gw.event_counts() == (0, 0), 5.0), \
        gw.status()
    assert quiet_upstream(gw, lvd, dom) < 100
    stable.close()
    churn.close()
    assert wait_until(lambda: gw.status()["sessions"] == 0, 5.0), \
        gw.status()
    log = gw.log_text()
    assert " error " not in log, [ln for ln in log.splitlines()
                                  if " error " in ln][:5]
    # last, so that everything above is checked as well: no subscriber got
    # an error (before e39ca34 some got libvirtd's "event callback already
    # tracked"; the two tests below pin that down)
    assert stats["errors"] == [], stats
    assert [ch.errors for ch in churners] == [[]] * len(churners)


# Two ways a subscriber can meet a registration of the same key that is
# still live upstream on the gateway's event connection. libvirtd refuses a
# second registration of one (event, filter) per connection ("event callback
# already tracked", VIR_ERR_INVALID_ARG), so the gateway must not make one
# before the previous one is gone. libvirtd is stopped (SIGSTOP) to hold the
# upstream answers while the gateway decides; nothing else is timing-bound.

def _register_while_stopped(lvd, gw, first_leaves):
    """One attempt: the first subscriber's registration ends (first_leaves)
    while libvirtd is stopped, then a second subscriber registers the same
    key. Returns the second subscriber's error message, or None."""
    args = harness.xdr_event_register_args(DOMAIN_EVENT_ID_LIFECYCLE)
    with RawClient(port=gw.port) as c1, RawClient(port=gw.port) as c2:
        c1.handshake()
        c2.handshake()
        stopped = first_leaves(c1, args)
        try:
            c2.send_packet(harness.REMOTE_PROGRAM, 1, 316, harness.TYPE_CALL,
                           c2.next_serial(), payload=args)
            time.sleep(0.05)
        finally:
            if stopped:
                lvd.sigcont()
        pkt = c2.recv_packet(timeout=5.0)
        assert pkt.type == harness.TYPE_REPLY and pkt.proc == 316
        err = (harness.decode_error(pkt.payload)["message"]
               if pkt.status != harness.STATUS_OK else None)
    # only the keeper's registration is left
    assert wait_until(lambda: gw.event_counts() == (1, 1), 5.0), \
        gw.status()
    return err


def test_resubscribe_while_deregistration_in_flight(
        libvirtd, gateway, raw_subscribers):
    """The last subscriber deregisters (the gateway answers it and sends
    DEREGISTER upstream) and a new one registers the same event before
    libvirtd has processed that DEREGISTER."""
    lvd = libvirtd
    gw = gateway(events_config(lvd))
    keeper = raw_subscribers(port=gw.port)      # keeps the pool's link
    assert keeper.register(DOMAIN_EVENT_ID_REBOOT) == 0

    def deregister_while_stopped(c1, args):
        cid = harness.raw_register_event(c1)
        lvd.sigstop()
        pkt = harness.raw_deregister_event(c1, cid)
        assert pkt.status == harness.STATUS_OK
        return True

    errors = []
    for _ in range(30):
        err = _register_while_stopped(lvd, gw, deregister_while_stopped)
        if err:
            errors.append(err)
            break
    assert errors == [], (
        "a new subscriber got libvirtd's answer to a duplicate registration "
        "on the gateway's connection: %s" % errors)


def test_subscribe_while_abandoned_registration_pending(
        libvirtd, gateway, raw_subscribers):
    """The first subscriber of a key hangs up while its registration is
    still in flight upstream, and a new subscriber registers the same key
    before libvirtd answered."""
    lvd = libvirtd
    gw = gateway(events_config(lvd))
    keeper = raw_subscribers(port=gw.port)
    assert keeper.register(DOMAIN_EVENT_ID_REBOOT) == 0

    def hang_up_while_pending(c1, args):
        lvd.sigstop()
        c1.send_packet(harness.REMOTE_PROGRAM, 1, 316, harness.TYPE_CALL,
                       c1.next_serial(), payload=args)
        time.sleep(0.05)
        c1.close()
        time.sleep(0.05)
        return True

    errors = []
    for _ in range(10):
        err = _register_while_stopped(lvd, gw, hang_up_while_pending)
        if err:
            errors.append(err)
            break
    assert errors == [], (
        "a new subscriber got libvirtd's answer to a duplicate registration "
        "on the gateway's connection: %s" % errors)


# --------------------------------------------------------------------------
# a subscriber that does not read
# --------------------------------------------------------------------------

QUEUE_LIMIT = 65536
SLOW_ROUNDS = 1000
SLOW_NAME = "slow-" + "x" * 250     # ~330 bytes per event
SLOW_PAUSE = 0.001


def test_subscriber_that_never_reads_is_cut_off(
        libvirtd, gateway, controller, event_clients, tmp_path):
    """A raw subscriber that never reads is cut off once its queue passes
    events.max_queue_bytes; five libvirt-python subscribers of the same
    registration get every event, in bounded time.

    The one that never reads comes in over the gateway's unix listener: on
    loopback TCP the kernel would first absorb megabytes (send-buffer
    autotuning) before anything queued in the gateway; a unix socket holds
    about net.core.wmem_default (~200 KiB). Events come at a few hundred a
    second (a pause after every call), so that a reader that keeps up is
    never more than a few events behind (64 KiB is ~200 of them)."""
    lvd = libvirtd
    sock = str(tmp_path / "gw.sock")
    gw = gateway(events_config(
        lvd, events={"max_queue_bytes": QUEUE_LIMIT},
        listeners=[{"name": "tcp", "auth": "none",
                    "address": "127.0.0.1:%d" % harness.free_port()},
                   {"name": "local", "auth": "none", "unix": sock}]))
    ctl = controller(lvd)
    dom = ctl.defineXML("<domain type='test'><name>%s</name>"
                        "<memory>65536</memory><os><type>hvm</type></os>"
                        "</domain>" % SLOW_NAME)
    dom.create()

    readers = event_clients()
    assert readers.open(gw.uri(), n=5)["errors"] == []
    slow = RawClient(unix=sock)
    try:
        slow.handshake()
        assert harness.raw_register_event(slow) == 0
        # one pool, one registration: the unix and TCP sessions share it
        assert pools_with_events(gw) == [("test:///default", False, 1, 6)]

        sent = flip(dom, SLOW_ROUNDS, pause=SLOW_PAUSE)
        counts = readers.wait_counts(2 * SLOW_ROUNDS, timeout=60)
        cut = [ln.split(" ", 1)[1] for ln in gw.log_text().splitlines()
               if "event queue" in ln]
        assert counts == [2 * SLOW_ROUNDS] * 5, (counts, cut)
        time.sleep(0.3)
        delays = []
        for evs in readers.events()["events"]:
            check_sequence(evs, SLOW_ROUNDS, SLOW_NAME)
            delays.extend(e[0] - s for e, s in zip(evs, sent))
        p50, p99, worst = (percentile(delays, 50), percentile(delays, 99),
                           max(delays))
        print("per-event delay to the readers: p50 %.1f ms, p99 %.1f ms, "
              "max %.1f ms (%d events)" % (p50 * 1e3, p99 * 1e3, worst * 1e3,
                                           len(delays)))
        assert worst < 3.0, "an event took %.3f s to reach a reader" % worst

        # the one that never read, and only that one, was cut off, with a
        # warning
        assert wait_until(lambda: "event queue overflow"
                          in gw.log_text(), 5.0)
        cut = [ln.split(" ", 1)[1] for ln in gw.log_text().splitlines()
               if "event queue" in ln]
        assert len(cut) == 2, cut
        assert cut[0].startswith("warn ") and "cut off" in cut[0], cut
        assert "closed: event queue overflow" in cut[1], cut
        assert pools_with_events(gw) == [("test:///default", False, 1, 5)]
        # what it got before the cut is an unbroken prefix of the events
        assert slow.wait_closed(timeout=10.0)
        got = [harness.decode_lifecycle(p.payload)
               for p in slow.drained if p.type == harness.TYPE_MESSAGE]
        assert 0 < len(got) < 2 * SLOW_ROUNDS
        assert got == [(0, n, e, d) for n, e, d
                       in flip_events(SLOW_ROUNDS, SLOW_NAME)[:len(got)]]
    finally:
        slow.close()

    # the others are undisturbed
    flip(dom, 1)
    assert readers.wait_counts(2 * SLOW_ROUNDS + 2, timeout=10) == \
        [2 * SLOW_ROUNDS + 2] * 5
    assert gw.running()


PROC_DOMAIN_GET_XML_DESC = 14


def test_reading_subscriber_with_a_large_reply_is_not_cut_off(
        libvirtd, gateway, controller, raw_subscribers):
    """The queue limit is for subscribers that stop reading. A subscriber
    that reads all the time but asks for a large reply (a 300 KB domain
    XML, far below libvirt's 4 MiB string limit) must not be cut off
    because events arrive while that reply is on its way out to it."""
    lvd = libvirtd
    gw = gateway(events_config(lvd, events={"max_queue_bytes": QUEUE_LIMIT}))
    ctl = controller(lvd)
    ctl.defineXML("<domain type='test'><name>bigdesc</name>"
                  "<description>%s</description><memory>65536</memory>"
                  "<os><type>hvm</type></os></domain>" % ("d" * 300000))
    sub = raw_subscribers(port=gw.port)
    cid = sub.register()
    big = sub.client.lookup_domain("bigdesc")
    sub.start()

    # events keep coming: another connection flips "test" meanwhile
    stop = threading.Event()
    sent = []

    def flipper():
        dom = controller(lvd).lookupByName("test")
        while not stop.is_set():
            flip(dom, 1, sent=sent)
            time.sleep(0.002)

    ft = threading.Thread(target=flipper, daemon=True)
    ft.start()
    failure = None
    try:
        for i in range(30):
            pkt = sub.call(PROC_DOMAIN_GET_XML_DESC,
                           harness.xdr_domain(big["name"], big["uuid"],
                                              big["id"])
                           + harness.xdr_u32(0), timeout=10)
            assert pkt.status == harness.STATUS_OK
            assert len(pkt.payload) > 300000
    except harness.HarnessError as e:
        failure = "request %d: %s" % (i, e)
    finally:
        stop.set()
        ft.join(10)
    cut = [ln.split(" ", 1)[1] for ln in gw.log_text().splitlines()
           if "event queue" in ln]
    assert (failure, sub.closed_at, cut) == (None, None, []), (
        "a subscriber that reads was cut off for 'event queue overflow' "
        "(its queue held the reply to its own call)")
    rounds = len(sent) // 2
    assert sub.wait_events(2 * rounds, timeout=10) == 2 * rounds
    assert sub.lifecycle() == [(cid, "test", e, d)
                               for _, e, d in flip_events(rounds)]


# --------------------------------------------------------------------------
# libvirtd restarted under the subscribers
# --------------------------------------------------------------------------

def test_subscribers_survive_libvirtd_restart(
        libvirtd, gateway, controller, event_clients, raw_subscribers):
    """libvirtd killed (-9) and started again on the same port: the gateway
    registers again, subscribers keep their ids, and every event after the
    restart arrives exactly once."""
    lvd = libvirtd
    gw = gateway(events_config(lvd))
    ec = event_clients()
    assert ec.open(gw.uri(), n=3)["errors"] == []
    a = raw_subscribers(port=gw.port)
    a_reboot = a.register(DOMAIN_EVENT_ID_REBOOT)
    a_life = a.register(DOMAIN_EVENT_ID_LIFECYCLE)
    b = raw_subscribers(port=gw.port)
    b_life = b.register(DOMAIN_EVENT_ID_LIFECYCLE)
    assert (a_reboot, a_life, b_life) == (0, 1, 0)
    a.start()
    b.start()
    assert gw.event_counts() == (2, 6)

    dom = controller(lvd).lookupByName("test")
    flip(dom, 2)
    assert ec.wait_counts(4, timeout=10) == [4] * 3

    lvd.kill9()
    assert wait_until(lambda: gw.event_counts() == (0, 6), 10.0), \
        gw.status()
    lvd.start()
    assert wait_until(lambda: gw.event_counts() == (2, 6), 15.0), \
        gw.status()
    assert "re-registered 2 event registrations" in gw.log_text()

    dom = controller(lvd).lookupByName("test")
    flip(dom, 5)
    counts = ec.wait_counts(14, timeout=15)
    assert counts == [14] * 3, counts
    assert a.wait_events(14, timeout=10) and b.wait_events(14, timeout=10)
    time.sleep(0.5)                     # a duplicate would arrive now
    for evs in ec.events()["events"]:
        check_sequence(evs, 7)
    assert ec.request(op="alive")["alive"] == [1, 1, 1]
    for sub, cid in ((a, a_life), (b, b_life)):
        got = sub.lifecycle()
        assert got == [(cid, "test", e, d) for _, e, d in flip_events(7)]
        assert sub.closed_at is None
    assert gw.event_counts() == (2, 6)


@pytest.mark.parametrize("value,valid", [(65535, False), (65536, True),
                                         (8 << 20, True)])
def test_max_queue_bytes_bounds(virtmux_bin, value, valid):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", "test+tcp://127.0.0.1/default")],
        default_upstream="hv1", events={"max_queue_bytes": value})
    r = harness.check_config(cfg, binary=virtmux_bin)
    assert r.returncode == (0 if valid else 1), (r.stdout, r.stderr)
    if not valid:
        assert "events.max_queue_bytes" in r.stderr

