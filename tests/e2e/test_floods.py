"""Floods of hostile or merely odd input, each measured against a
well-behaved, SASL-authenticated client (faultkit.Probe, its own process,
one DOMAIN_GET_INFO every 5 ms).

Every test alternates quiet windows and flood windows (SLICES floods of
FLOOD_S/SLICES seconds each, BASELINE_S seconds of quiet around them, so
that changes in the box's load from other work fall on both), takes the
probe's p99 latency over each kind, and asserts

    p99(during) <= 2 * p99(quiet) + FLOOR_MS

in one of ATTEMPTS measurements (default 3; every attempt is printed).
FLOOR_MS (5 ms) keeps scheduler noise on millisecond numbers from deciding
the result. The flooding clients run at nice 10 (FLOOD_NICE): they stand for
other hosts, and the CPU their Python takes on a shared 2-core box is not
the gateway's doing; the gateway, libvirtd and the probe run at nice -10
(MEASURED_NICE). The probe must see no error at all, and the gateway's
/status totals must be back at rest after each flood.
"""

import os
import random
import resource
import selectors
import socket
import struct
import time

import pytest

import faultkit
import harness
import pki
from faultkit import Probe, wait_rest
from harness import (RawClient, XdrReader, build_packet, start_call,
                     xdr_domain, xdr_i32, xdr_u32)

BASELINE_S = 4.0
FLOOD_S = 3.0
SLICES = 3
# Other suites share this box and their load comes in bursts that nice
# levels do not fully keep out: a p99 over the bound is measured again, up to
# ATTEMPTS times, and the test fails only if every attempt is over.
ATTEMPTS = int(os.environ.get("VIRTMUX_FLOOD_ATTEMPTS", "3"))
# (a sanitizer build, VIRTMUX_TIME_SCALE, is slower at everything: the floor scales with it)
FLOOR_MS = float(os.environ.get("VIRTMUX_P99_FLOOR_MS", "5")) * harness.scaled(1)
PROBE_INTERVAL = 0.005
# The flooding clients stand for other hosts: they run at nice 10 so that
# the CPU their Python takes on this (shared, 2-core) box does not count
# against the gateway.
FLOOD_NICE = 10
# ... and the gateway, libvirtd and the probe run at nice -10: the box is
# shared with other test suites, whose load would otherwise decide the p99
MEASURED_NICE = -10
FLOOD_TIMEOUT_S = 300
USER, PASSWORD = "alice", "secret"
OFFENDERS = int(os.environ.get("VIRTMUX_FLOOD_CONNECTIONS", "10000"))
MAX_UNAUTH = 50
AUTH_TIMEOUT_S = 2


@pytest.fixture
def env(libvirtd, gateway, tmp_path):
    """A plain listener (auth none) for the raw floods, a SASL listener for
    the probe and the unauthenticated flood, and the probe."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        # the gateway inherits this when it is started below
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    db = pki.make_sasldb(str(tmp_path / "sasldb"), {USER: PASSWORD})
    plain, sasl = harness.free_port(), harness.free_port()
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri,
                                max_connections=2, max_inflight=4)],
        default_upstream="hv1",
        listeners=[{"name": "plain", "address": "127.0.0.1:%d" % plain},
                   {"name": "sasl", "address": "127.0.0.1:%d" % sasl,
                    "auth": "sasl"}],
        limits={"max_clients": OFFENDERS + 1000,
                "max_unauthenticated": MAX_UNAUTH,
                "auth_timeout_s": AUTH_TIMEOUT_S},
        sasl={"sasldb": db, "mechanisms": ["digest-md5"]}, admin=True)
    gw = gateway(cfg)
    probe = Probe("test+tcp://127.0.0.1:%d/default" % sasl, USER, PASSWORD,
                  interval=PROBE_INTERVAL)
    for pid in (gw.proc.pid, libvirtd.proc.pid, probe.proc.pid):
        renice_all_threads(pid, MEASURED_NICE)
    try:
        yield gw, plain, sasl, probe
    finally:
        probe.close()


def merge_facts(a, b):
    """Per-slice facts summed (numbers), joined (lists), maximised (keys
    with "peak"), or kept (anything else)."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif "peak" in k:
            out[k] = max(out[k], v)
        elif isinstance(v, (int, float, list)) and not isinstance(v, bool):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


def measure_flood(probe, flood, name):
    """SLICES rounds of (quiet window, flood(i, seconds)) and a last quiet
    window, the probe measured throughout; flood returns a dict of facts.
    Returns (facts, quiet samples, flood samples)."""
    probe.take()
    base, during, facts, took = [], [], {}, 0.0
    for i in range(SLICES + 1):
        time.sleep(BASELINE_S / (SLICES + 1))
        base += probe.take()
        if i == SLICES:
            break
        t0 = time.monotonic()
        t, res = start_call(niced, flood, i, FLOOD_S / SLICES)
        t.join(FLOOD_TIMEOUT_S)
        assert not t.is_alive(), "%s did not end in %d s" % (
            name, FLOOD_TIMEOUT_S)
        took += time.monotonic() - t0
        during += probe.take()
        if res.error is not None:
            raise res.error
        facts = merge_facts(facts, res.value)
    return dict(facts, seconds=round(took, 1)), base, during


def run_flood(probe, flood, name):
    """measure_flood up to ATTEMPTS times, until the p99 bound holds; the
    probe must see no error in any attempt. Returns the facts merged over
    the attempts, with "attempts"."""
    facts, verdicts = {}, []
    for attempt in range(1, ATTEMPTS + 1):
        got, base, during = measure_flood(probe, flood, name)
        facts = merge_facts(facts, got)
        nb, _, p99b, _, errb = faultkit.latency_summary(base)
        nd, _, p99d, worst, errd = faultkit.latency_summary(during)
        print("%s (attempt %d): %s; probe p99 %.2f ms quiet (%d calls), "
              "%.2f ms during (%d calls, max %.1f ms)"
              % (name, attempt, got, p99b, nb, p99d, nd, worst))
        assert not errb and not errd, (errb + errd)[:5]
        assert nb >= 50 and nd >= 50, (nb, nd)
        verdicts.append((round(p99d, 2), round(p99b, 2)))
        if p99d <= 2 * p99b + FLOOR_MS:
            break
    else:
        raise AssertionError("%s: probe p99 during > 2 x quiet + %g ms in "
                             "all %d attempts: %s (during, quiet)"
                             % (name, FLOOR_MS, ATTEMPTS, verdicts))
    facts["attempts"] = attempt
    return facts


def renice_all_threads(pid, value):
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except ProcessLookupError:
            pass


def niced(fn, *args):
    """fn(*args) in this thread at nice FLOOD_NICE (Linux: the nice value
    is per thread, and threads fn starts inherit it)."""
    os.setpriority(os.PRIO_PROCESS, 0, FLOOD_NICE)
    return fn(*args)


def at_rest(gw, probe):
    """Only the probe's session is left and nothing is in progress."""
    probe.pause()
    try:
        bad, totals = wait_rest(gw, sessions=1, max_links=2, timeout=15.0)
        assert not bad, (bad, totals)
    finally:
        probe.resume()


def until(seconds):
    end = time.monotonic() + seconds
    first = [True]

    def more():
        if first[0]:
            first[0] = False
            return True
        return time.monotonic() < end
    return more


# --------------------------------------------------------------------------
# connections that never authenticate
# --------------------------------------------------------------------------

def offender_flood(port, total, batch=200, max_open=1500, timeout=180.0):
    """Open `total` connections that send nothing, `batch` at a time with at
    most `max_open` open; each must be closed by the gateway. Returns the
    number closed cleanly (EOF, no byte), reset, and sent data."""
    sel = selectors.DefaultSelector()
    opened = clean = reset = data = refused = 0
    deadline = time.monotonic() + timeout
    try:
        while (opened < total or sel.get_map()) \
                and time.monotonic() < deadline:
            n = min(batch, total - opened, max_open - len(sel.get_map()))
            for _ in range(max(0, n)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(5.0)
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    refused += 1
                    s.close()
                    opened += 1
                    continue
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                opened += 1
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    got = s.recv(64)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    got = None
                sel.unregister(s)
                s.close()
                if got is None:
                    reset += 1
                elif got == b"":
                    clean += 1
                else:
                    data += 1
        left = len(sel.get_map())
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    return {"opened": opened, "clean": clean, "reset": reset, "data": data,
            "refused": refused, "left_open": left}


def test_10000_unauthenticated_connections(env):
    gw, plain, sasl, probe = env
    share = OFFENDERS // SLICES
    facts = run_flood(probe, lambda i, _s: offender_flood(
        sasl, share if i < SLICES - 1 else OFFENDERS - share * i),
                      "%d unauthenticated connections" % OFFENDERS)
    total = OFFENDERS * facts["attempts"]
    assert facts["opened"] == total
    assert facts["left_open"] == 0, facts
    assert facts["data"] == 0 and facts["refused"] == 0, facts
    # nothing was sent, so the gateway's close is a FIN, never a reset
    assert facts["clean"] == total, facts
    # all come from 127.0.0.1: a few hold the per-source slots until
    # auth_timeout_s, every other one is refused on arrival
    unauth = gw.status()["unauthenticated"]
    refused = unauth["refused"] + unauth["refused_per_source"]
    print("refused on arrival: %d (%s)" % (refused, unauth))
    assert refused >= total * 9 // 10, unauth
    at_rest(gw, probe)
    assert gw.status()["totals"]["unauthenticated"] == 0


# --------------------------------------------------------------------------
# one byte at a time
# --------------------------------------------------------------------------

PROC_LIST_ALL = harness.PROC_CONNECT_LIST_ALL_DOMAINS


def slow_call(c, proc, payload=b"", delay=0.002):
    serial = c.next_serial()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.send_slowly(build_packet(harness.REMOTE_PROGRAM, 1, proc,
                               harness.TYPE_CALL, serial, payload=payload),
                  1, delay)
    pkt = c.recv_packet(timeout=10.0)
    assert (pkt.type, pkt.serial, pkt.proc, pkt.status) == \
        (harness.TYPE_REPLY, serial, proc, harness.STATUS_OK), pkt
    return pkt


def trickler(port, more, results):
    """Handshake and list domains, every packet one byte per write."""
    n = 0
    while more():
        with RawClient(port=port) as c:
            r = XdrReader(slow_call(c, harness.PROC_AUTH_LIST).payload)
            assert [r.i32() for _ in range(r.u32())] == [0]
            slow_call(c, harness.PROC_CONNECT_OPEN,
                      harness.xdr_opt_string("test:///default") + xdr_u32(0))
            r = XdrReader(slow_call(c, PROC_LIST_ALL,
                                    xdr_i32(1) + xdr_u32(0)).payload)
            assert [r.domain()["name"] for _ in range(r.u32())] == ["test"]
            n += 1
    results.append(n)


def test_byte_at_a_time(env):
    gw, plain, sasl, probe = env

    def flood(_i, seconds):
        more, results, threads = until(seconds), [], []
        for _ in range(4):
            threads.append(start_call(trickler, plain, more, results))
        for t, res in threads:
            t.join(60)
            assert not t.is_alive(), "a trickling client hangs"
            assert res.error is None, res.error
        return {"sessions": sum(results)}
    facts = run_flood(probe, flood, "byte-at-a-time")
    assert facts["sessions"] >= 4
    at_rest(gw, probe)


# --------------------------------------------------------------------------
# length words
# --------------------------------------------------------------------------

BAD_LENGTHS = [0, 1, 27, 0xFFFFFFFF, harness.MAX_PACKET + 1]


def bad_length(port, value, opened):
    """True if the gateway closes without sending anything."""
    with RawClient(port=port) as c:
        if opened:
            c.handshake()
        c.send(xdr_u32(value))
        closed = c.wait_closed(3.0)
        return closed and c.drained == [] and c._buf == b""


def test_length_words(env):
    gw, plain, sasl, probe = env
    rss0 = faultkit.proc_rss_kib(gw.proc.pid)

    def flood(_i, seconds):
        more, kept_open, rounds = until(seconds), [], 0
        while more():
            for opened in (False, True):
                for v in BAD_LENGTHS:
                    if not bad_length(plain, v, opened):
                        kept_open.append((v, opened))
            rounds += 1
        return {"rounds": rounds, "not_closed_cleanly": kept_open}
    facts = run_flood(probe, flood, "bad length words")
    assert facts["not_closed_cleanly"] == [], facts

    # the largest legal packet: the gateway waits for the rest of it
    with RawClient(port=plain) as c:
        c.handshake()
        dom = c.lookup_domain("test")
        body = struct.pack(">IIiiIi", harness.REMOTE_PROGRAM, 1,
                           harness.PROC_DOMAIN_GET_INFO, harness.TYPE_CALL,
                           77, 0) + xdr_domain(dom["name"], dom["uuid"],
                                               dom["id"])
        c.send(xdr_u32(harness.MAX_PACKET) + body + b"\0" * 4096)
        assert not c.wait_closed(1.5), "a legal length word was refused"
        grown = faultkit.proc_rss_kib(gw.proc.pid) - rss0
    print("legal 33554436-byte length word held open; RSS %+d KiB" % grown)
    at_rest(gw, probe)


# --------------------------------------------------------------------------
# garbage
# --------------------------------------------------------------------------

def garbage_session(port, rnd, ncalls):
    """Random CALLs (random procedure, random payload) and REPLY, MESSAGE
    and STREAM packets; returns counts. A CALL gets a REPLY or the session
    is closed; the other packets get nothing; a session left open still
    works."""
    out = {"ok": 0, "error": 0, "closed": 0}
    with RawClient(port=port) as c:
        c.handshake()
        first = c.serial
        pkts = []
        for i in range(ncalls):
            proc = rnd.randrange(3, 460)
            pkts.append(build_packet(
                harness.REMOTE_PROGRAM, 1, proc, harness.TYPE_CALL,
                first + i,
                payload=bytes(rnd.getrandbits(8)
                              for _ in range(rnd.choice((0, 4, 8, 64,
                                                         rnd.randrange(1, 600)))))))
        c.serial = first + ncalls
        for mtype in (harness.TYPE_REPLY, harness.TYPE_MESSAGE,
                      harness.TYPE_STREAM):
            pkts.append(build_packet(
                harness.REMOTE_PROGRAM, 1, rnd.randrange(1, 460), mtype,
                rnd.randrange(1 << 32), rnd.randrange(3),
                bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(64)))))
        c.send(b"".join(pkts))
        want = set(range(first, first + ncalls))
        try:
            while want:
                pkt = c.recv_packet(timeout=10.0)
                if pkt.type != harness.TYPE_REPLY:
                    continue            # a stream or event the garbage made
                assert pkt.serial in want, pkt
                want.discard(pkt.serial)
                out["ok" if pkt.status == harness.STATUS_OK else "error"] += 1
            # nothing answers the REPLY/MESSAGE/STREAM packets: the next
            # reply is this call's
            assert [d["name"] for d in c.list_all_domains()] == ["test"]
        except harness.ConnectionClosed:
            out["closed"] += 1
    return out


def test_garbage_payloads(env):
    gw, plain, sasl, probe = env
    seed = int(os.environ.get("VIRTMUX_GARBAGE_SEED", str(os.getpid())))
    rnd = random.Random(seed)

    def flood(_i, seconds):
        more = until(seconds)
        totals = {"ok": 0, "error": 0, "closed": 0, "sessions": 0}
        while more():
            got = garbage_session(plain, rnd, 20)
            totals["sessions"] += 1
            for k, v in got.items():
                totals[k] += v
        return dict(totals, seed=seed)
    facts = run_flood(probe, flood, "garbage")
    assert facts["error"] > 0
    assert gw.running()
    at_rest(gw, probe)


def test_client_reply_message_stream_dropped(env):
    """REPLY, MESSAGE and STREAM packets from a client are dropped without
    an answer; the session goes on."""
    gw, plain, sasl, probe = env
    with RawClient(port=plain) as c:
        c.handshake()
        dom = c.lookup_domain("test")
        for mtype, status in ((harness.TYPE_REPLY, 0), (harness.TYPE_REPLY, 1),
                              (harness.TYPE_MESSAGE, 0),
                              (harness.TYPE_STREAM, 2),
                              (harness.TYPE_STREAM, 0)):
            c.send(build_packet(harness.REMOTE_PROGRAM, 1,
                                harness.PROC_DOMAIN_GET_INFO, mtype, 5000,
                                status, xdr_domain(dom["name"], dom["uuid"],
                                                   dom["id"])))
        # the next packet is the reply to this call, nothing else
        assert c.domain_info(dom)[0] == 1
        with pytest.raises(socket.timeout):
            c.recv_packet(timeout=0.5)
    at_rest(gw, probe)


# --------------------------------------------------------------------------
# 1,000 calls in one write
# --------------------------------------------------------------------------

def pipelined(port, n=1000):
    with RawClient(port=port, timeout=30.0) as c:
        c.handshake()
        dom = c.lookup_domain("test")
        want = c.domain_info(dom)
        args = xdr_domain(dom["name"], dom["uuid"], dom["id"])
        serials = [10000 + k for k in range(n)]
        burst = b"".join(build_packet(harness.REMOTE_PROGRAM, 1,
                                      harness.PROC_DOMAIN_GET_INFO,
                                      harness.TYPE_CALL, s, payload=args)
                         for s in serials)
        sender, sent = start_call(c.send, burst)
        seen = []
        while len(seen) < n:
            pkt = c.recv_packet(timeout=30.0)
            if pkt.type == harness.TYPE_MESSAGE:
                continue
            assert (pkt.type, pkt.proc, pkt.status) == (
                harness.TYPE_REPLY, harness.PROC_DOMAIN_GET_INFO,
                harness.STATUS_OK), (pkt, harness.decode_error(pkt.payload))
            r = XdrReader(pkt.payload)
            assert (r.u32(), r.u64(), r.u64(), r.u32()) == want[:4]
            seen.append(pkt.serial)
        sender.join(10)
        assert sent.error is None, sent.error
        assert sorted(seen) == serials, "serials lost or repeated"
        return len(seen)


def test_1000_pipelined_calls(env):
    gw, plain, sasl, probe = env

    def flood(_i, seconds):
        more, calls = until(seconds), 0
        while more():
            calls += pipelined(plain)
        return {"calls": calls}
    facts = run_flood(probe, flood, "1000 pipelined calls per write")
    assert facts["calls"] >= 1000
    at_rest(gw, probe)


# --------------------------------------------------------------------------
# a client that sends and never reads
# --------------------------------------------------------------------------

NEVER_READ_MIB = 28
RSS_BOUND_KIB = 16 * 1024


def never_reader(port, packet, opened, seconds, rss):
    """Send `packet` over and over (NEVER_READ_MIB in all) without reading
    a byte; returns (bytes the gateway accepted, largest RSS rise seen)."""
    c = RawClient(port=port, rcvbuf=4096)
    try:
        if opened:
            c.handshake()
        rss0 = rss()
        blob = packet * (NEVER_READ_MIB * 1024 * 1024 // len(packet))
        c.sock.setblocking(False)
        sent, view, peak = 0, memoryview(blob), 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                n = c.sock.send(view[sent:sent + 65536])
                sent += n
                if sent >= len(blob):
                    break
            except BlockingIOError:
                time.sleep(0.01)
            peak = max(peak, rss() - rss0)
        time.sleep(0.3)
        peak = max(peak, rss() - rss0)
        return sent, peak
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["ping", "call-before-open",
                                  "call-after-open"])
def test_client_that_never_reads(env, kind):
    """Local answers (PONG; "connection not open" errors) and forwarded
    replies to a client that never reads: the gateway stops reading that
    client once 1 MiB is unsent to it, so it holds a bounded amount."""
    gw, plain, sasl, probe = env
    if kind == "ping":
        pkt = build_packet(harness.KEEPALIVE_PROGRAM, 1,
                           harness.PROC_KEEPALIVE_PING, harness.TYPE_MESSAGE,
                           0)
    else:
        pkt = build_packet(harness.REMOTE_PROGRAM, 1,
                           harness.PROC_CONNECT_LIST_ALL_DOMAINS,
                           harness.TYPE_CALL, 7,
                           payload=xdr_i32(1) + xdr_u32(0))
    opened = kind == "call-after-open"

    def flood(_i, seconds):
        sent, peak = never_reader(
            plain, pkt, opened, seconds,
            lambda: faultkit.proc_rss_kib(gw.proc.pid))
        return {"sent_peak_kib": sent // 1024, "rss_peak_rise_kib": peak}
    facts = run_flood(probe, flood, "never reads (%s)" % kind)
    # Under AddressSanitizer freed memory sits in its quarantine, so RSS says nothing there;
    # what the gateway accepted (below) is the bound, and LeakSanitizer checks the rest.
    if not harness.is_sanitized(gw.binary):
        assert facts["rss_peak_rise_kib"] < RSS_BOUND_KIB, facts
    # the gateway stopped reading: most of each flood was never accepted
    assert facts["sent_peak_kib"] < NEVER_READ_MIB * 1024 // 2, facts
    at_rest(gw, probe)
