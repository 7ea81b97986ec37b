#!/usr/bin/python3
"""Domain event delivery: N subscribers straight to libvirtd versus the same
N subscribers through virtmux (one upstream registration for all of them).

One private libvirtd (test driver, loopback TCP) and one virtmux in front of
it are started with tests/e2e/harness.py. For every N in --subscribers and
every round, N raw-protocol subscribers (spread over --procs processes,
each an epoll loop over its sockets) connect, open test:///default and
register for domain lifecycle events (REMOTE_PROC_CONNECT_DOMAIN_EVENT_
CALLBACK_REGISTER_ANY, no filter). A controller connected straight to
libvirtd then suspends and resumes the domain "test" --flips times, pausing
--pause-ms after every call. Each round starts with a baseline run without
subscribers (what the controller's calls alone cost libvirtd).

Measured per run:
  * latency        receipt time in the subscriber process minus the time
                   just before the suspend/resume call was issued
                   (time.monotonic(), CLOCK_MONOTONIC in every process),
                   over every event of every subscriber: p50, p99, max
  * delivery       events each subscriber got, in order and with its own
                   callback id; lost, wrong or duplicated events are counted
  * CPU seconds    utime+stime from /proc/PID/stat of libvirtd, virtmux and
                   the subscriber processes from just before the first call
                   until every subscriber had every event, plus the
                   machine's busy time from /proc/stat ("other" is the rest)
  * registrations  virtmux's upstream event registrations and subscribers
                   (GET /status) and libvirtd's client count (virt-admin)
                   while the subscribers are connected

Run as root with /usr/bin/python3 (the interpreter with the libvirt module):

    /usr/bin/python3 bench/bench_events.py --write docs/BENCHMARKS.md

All traffic stays on 127.0.0.1; every wait is bounded and every process
that is started is stopped in a finally block.
"""

import argparse
import datetime
import os
import selectors
import shlex
import socket
import struct
import sys
import time
from array import array

import benchlib
from benchlib import REPO, TARGETS, TICK, BenchError, fmt, harness, ratio

NAME = "bench_events"
DOMAIN = "test"
OPEN_NAME = "test:///default"

P99_GOAL_MS = 50.0
GOAL_N = 200
SETUP_TIMEOUT = 60.0        # all subscribers of a run connected by then
DRAIN_TIMEOUT = 20.0        # after the last call, every event arrives by then

PROC_REGISTER = harness.PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY
PROC_LIFECYCLE = harness.PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE
SUSPENDED = harness.DOMAIN_EVENT_SUSPENDED
RESUMED = harness.DOMAIN_EVENT_RESUMED

_HDR = struct.Struct(">IIIiiIi")       # length word + 24-byte header
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")


# --------------------------------------------------------------------------
# subscriber processes
# --------------------------------------------------------------------------

def _packet(proc, serial, payload=b""):
    """A CALL of the remote program."""
    return harness.build_packet(harness.REMOTE_PROGRAM, harness.REMOTE_VERSION,
                                proc, harness.TYPE_CALL, serial,
                                payload=payload)


def _blocking_call(sock, buf, proc, serial, payload=b""):
    """Send a CALL and read until its REPLY; returns (payload, leftover)."""
    sock.sendall(_packet(proc, serial, payload))
    while True:
        while len(buf) >= 4:
            length = _U32.unpack_from(buf, 0)[0]
            if len(buf) < length:
                break
            _, _, _, p, mtype, ser, status = _HDR.unpack_from(buf, 0)
            pkt, buf = buf[28:length], buf[length:]
            if mtype == harness.TYPE_REPLY and ser == serial:
                if status != harness.STATUS_OK:
                    raise BenchError("proc %d refused: %s" % (
                        proc, harness.decode_error(pkt).get("message")))
                return pkt, buf
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("peer closed during set-up (proc %d)" % proc)
        buf += chunk


def subscriber_process(port, count, pipe):
    """Entry point of one subscriber process (multiprocessing, spawn):
    `count` raw subscribers on 127.0.0.1:port."""
    socks, bufs, ids = [], [], []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b""
            _, buf = _blocking_call(s, buf, harness.PROC_AUTH_LIST, 0)
            _, buf = _blocking_call(
                s, buf, harness.PROC_CONNECT_OPEN, 1,
                harness.xdr_opt_string(OPEN_NAME) + harness.xdr_u32(0))
            ret, buf = _blocking_call(
                s, buf, PROC_REGISTER, 2,
                harness.xdr_event_register_args(
                    harness.DOMAIN_EVENT_ID_LIFECYCLE))
            ids.append(_I32.unpack_from(ret, 0)[0])
            socks.append(s)
            bufs.append(buf)
    except Exception as e:
        pipe.send(("error", "subscriber %d of %d: %r" % (len(socks) + 1,
                                                         count, e)))
        for s in socks:
            s.close()
        return
    pipe.send(("ready", ids))

    msg = pipe.recv() if pipe.poll(SETUP_TIMEOUT + 60) else ("quit",)
    if msg[0] != "go":
        for s in socks:
            s.close()
        return
    expected, deadline = msg[1], msg[2]

    sel = selectors.EpollSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    times = [array("d") for _ in socks]
    kinds = [array("b") for _ in socks]
    wrong_id = [0] * len(socks)
    other = [0] * len(socks)
    closed = [False] * len(socks)
    finished = [False] * len(socks)     # has every event, or was closed
    done = 0
    mono = time.monotonic
    while done < len(socks) and mono() < deadline:
        for key, _ in sel.select(timeout=0.2):
            i = key.data
            s = socks[i]
            try:
                chunk = s.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            t = mono()
            if not chunk:
                closed[i] = True
                sel.unregister(s)
                if not finished[i]:
                    finished[i] = True
                    done += 1
                continue
            buf = bufs[i] + chunk
            off, n = 0, len(buf)
            while n - off >= 4:
                length = _U32.unpack_from(buf, off)[0]
                if n - off < length:
                    break
                _, prog, _, proc, mtype, _, _ = _HDR.unpack_from(buf, off)
                if (prog == harness.REMOTE_PROGRAM and proc == PROC_LIFECYCLE
                        and mtype == harness.TYPE_MESSAGE):
                    if _I32.unpack_from(buf, off + 28)[0] != ids[i]:
                        wrong_id[i] += 1
                    nlen = _U32.unpack_from(buf, off + 32)[0]
                    pos = off + 36 + nlen + (-nlen % 4) + 16 + 4
                    times[i].append(t)
                    kinds[i].append(_I32.unpack_from(buf, pos)[0])
                else:
                    other[i] += 1
                off += length
            bufs[i] = buf[off:]
            if not finished[i] and len(times[i]) >= expected:
                finished[i] = True
                done += 1
    # hang up politely, as libvirt clients do: CONNECT_CLOSE, then wait for
    # the peer to close (libvirtd logs an error for each client that just
    # drops its socket)
    for s in socks:
        try:
            s.setblocking(True)
            s.settimeout(1.0)
            s.sendall(_packet(harness.PROC_CONNECT_CLOSE, 3))
        except OSError:
            pass
    end = time.monotonic() + 5.0
    for s in socks:
        try:
            s.settimeout(max(0.01, end - time.monotonic()))
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()
    pipe.send(("result", [t.tobytes() for t in times],
               [k.tobytes() for k in kinds], wrong_id, other,
               sum(closed)))


def _recv(pipe, deadline, what):
    return benchlib.recv_message(pipe, deadline, what,
                                 who="subscriber process")


# --------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------

def flip(dom, flips, pause, sent):
    for _ in range(flips):
        sent.append(time.monotonic())
        dom.suspend()
        time.sleep(pause)
        sent.append(time.monotonic())
        dom.resume()
        time.sleep(pause)


def run_one(target, port, nsubs, args, lvd, vmx, dom, rnd):
    nprocs = max(1, min(args.procs, nsubs)) if nsubs else 0
    split = benchlib.split_evenly(nsubs, nprocs)
    workers = []
    expected_kinds = [SUSPENDED, RESUMED] * args.flips
    nevents = len(expected_kinds)
    try:
        benchlib.start_workers(workers, subscriber_process,
                               [(port, k) for k in split])
        deadline = time.monotonic() + SETUP_TIMEOUT
        for _, pipe in workers:
            _recv(pipe, deadline, "ready")

        status = None
        if target == "virtmux" and nsubs:
            status = "%d / %d" % harness.pool_event_counts(vmx.status())
        try:
            lvd_clients = lvd.nclients()
        except harness.HarnessError:
            lvd_clients = None
        time.sleep(0.3)

        pids = {"libvirtd": [lvd.proc.pid], "virtmux": [vmx.proc.pid],
                "subscribers": [p.pid for p, _ in workers]}
        pause = args.pause_ms / 1000.0
        run_deadline = (time.monotonic() + nevents * (pause + 0.05)
                        + DRAIN_TIMEOUT)
        for _, pipe in workers:
            pipe.send(("go", nevents, run_deadline))
        s0 = benchlib.cpu_sample(pids)
        t0 = time.monotonic()
        sent = []
        flip(dom, args.flips, pause, sent)
        t_calls = time.monotonic() - t0
        results = []
        for _, pipe in workers:
            results.append(_recv(pipe, run_deadline + 10, "result"))
        s1 = benchlib.cpu_sample(pids)
        t1 = time.monotonic()
    finally:
        benchlib.stop_workers(workers, farewell=("quit",))

    lat = []
    lost = wrong = dup = wrong_id = other = closed = 0
    complete = 0
    for _, tbytes, kbytes, wid, oth, ncl in results:
        wrong_id += sum(wid)
        other += sum(oth)
        closed += ncl
        for tb, kb in zip(tbytes, kbytes):
            ts = array("d")
            ts.frombytes(tb)
            ks = array("b")
            ks.frombytes(kb)
            if len(ks) > nevents:
                dup += len(ks) - nevents
            if len(ks) < nevents:
                lost += nevents - len(ks)
            ok_here = True
            for i, (t, kind) in enumerate(zip(ts, ks)):
                if kind != expected_kinds[i]:
                    wrong += 1
                    ok_here = False
                    continue
                lat.append(t - sent[i])
            if ok_here and len(ks) == nevents:
                complete += 1
    lat.sort()
    window = t1 - t0
    cpu = {k: s1["cpu"][k] - s0["cpu"][k] for k in s0["cpu"]}
    busy = s1["busy"] - s0["busy"]
    return {
        "round": rnd, "target": target, "n": nsubs, "procs": len(split),
        "events": nevents, "delivered": len(lat), "complete": complete,
        "lost": lost, "wrong": wrong, "dup": dup, "wrong_id": wrong_id,
        "other": other, "closed": closed,
        "p50_ms": benchlib.percentile(lat, 50) * 1e3,
        "p99_ms": benchlib.percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "window_s": window, "calls_s": t_calls,
        "cpu_libvirtd": cpu["libvirtd"], "cpu_virtmux": cpu["virtmux"],
        "cpu_subscribers": cpu["subscribers"], "cpu_busy": busy,
        "cpu_other": max(0.0, busy - sum(cpu.values())),
        "vmx_status": status, "lvd_clients": lvd_clients,
    }


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------

MEDIAN_KEYS = ("p50_ms", "p99_ms", "max_ms", "window_s", "cpu_libvirtd",
               "cpu_virtmux", "cpu_subscribers", "cpu_busy", "cpu_other")
SUM_KEYS = ("delivered", "lost", "wrong", "dup", "wrong_id", "other",
            "closed", "complete")


def summarize(results):
    out = benchlib.summarize_rounds(results, MEDIAN_KEYS, SUM_KEYS,
                                    first_keys=("procs", "events"),
                                    max_keys=("lvd_clients",))
    for key, s in out.items():
        st = sorted({r["vmx_status"] for r in results
                     if (r["n"], r["target"]) == key and r["vmx_status"]})
        s["vmx_status"] = ", ".join(st) if st else None
    return out


def above_base(s, base):
    if base is None:
        return float("nan")
    return s["cpu_libvirtd"] - base["cpu_libvirtd"]


def main_table(summary, subs):
    base = summary.get((0, "direct"))
    out = ["| N | target | events per subscriber | delivered (lost, wrong) "
           "| p50 ms | p99 ms | max ms | libvirtd CPU s | libvirtd CPU s "
           "above baseline | virtmux CPU s | subscriber procs CPU s "
           "| other CPU s | window s | virtmux registrations / subscribers "
           "| libvirtd clients |",
           "|" + "---|" * 15]
    if base:
        out.append("| 0 | baseline (calls only) | - | - | - | - | - | %s | 0 "
                   "| %s | - | %s | %s | - | %s |"
                   % (fmt(base["cpu_libvirtd"]), fmt(base["cpu_virtmux"]),
                      fmt(base["cpu_other"]), fmt(base["window_s"], 1),
                      base["lvd_clients"] if base["lvd_clients"] is not None
                      else "n/a"))
    for n in subs:
        for t in TARGETS:
            s = summary.get((n, t))
            if not s:
                continue
            regs = s["vmx_status"] or "-"
            out.append(
                "| %d | %s | %d | %d (%d, %d) | %s | %s | %s | %s | %s | %s "
                "| %s | %s | %s | %s | %s |"
                % (n, t, s["events"], s["delivered"], s["lost"],
                   s["wrong"] + s["dup"] + s["wrong_id"],
                   fmt(s["p50_ms"], 2), fmt(s["p99_ms"], 2),
                   fmt(s["max_ms"], 1), fmt(s["cpu_libvirtd"]),
                   fmt(above_base(s, base)), fmt(s["cpu_virtmux"]),
                   fmt(s["cpu_subscribers"]), fmt(s["cpu_other"]),
                   fmt(s["window_s"], 1), regs,
                   s["lvd_clients"] if s["lvd_clients"] is not None
                   else "n/a"))
    return "\n".join(out)


def ratio_table(summary, subs):
    base = summary.get((0, "direct"))
    out = ["| N | p99 virtmux/direct | libvirtd CPU virtmux/direct "
           "| libvirtd CPU above baseline, virtmux/direct |",
           "|---|---|---|---|"]
    for n in subs:
        d, v = summary.get((n, "direct")), summary.get((n, "virtmux"))
        if not d or not v:
            continue
        va, da = above_base(v, base), above_base(d, base)
        if va == va and da == da and max(abs(va), abs(da)) < 3 * TICK:
            above = "both below 3 clock ticks (%.0f ms)" % (3 * TICK * 1e3)
        elif va == va and abs(va) < 3 * TICK:
            above = "≈0 (virtmux: %s s, below 3 clock ticks)" % fmt(va)
        else:
            above = "%s×" % fmt(ratio(va, da))
        out.append("| %d | %s× | %s× | %s |" % (
            n, fmt(ratio(v["p99_ms"], d["p99_ms"])),
            fmt(ratio(v["cpu_libvirtd"], d["cpu_libvirtd"])), above))
    return "\n".join(out)


def rounds_table(results):
    out = ["| round | N | target | p50 ms | p99 ms | max ms | libvirtd CPU s "
           "| virtmux CPU s | subscribers CPU s | other CPU s | lost "
           "| wrong |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        out.append("| %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %d "
                   "| %d |" % (r["round"], r["n"], r["target"],
                               fmt(r["p50_ms"]), fmt(r["p99_ms"]),
                               fmt(r["max_ms"], 1), fmt(r["cpu_libvirtd"]),
                               fmt(r["cpu_virtmux"]),
                               fmt(r["cpu_subscribers"]),
                               fmt(r["cpu_other"]), r["lost"],
                               r["wrong"] + r["dup"] + r["wrong_id"]))
    return "\n".join(out)


def interpretation(summary, subs, ncpu):
    lines = []
    base = summary.get((0, "direct"))
    v_goal = summary.get((GOAL_N, "virtmux"))
    if v_goal:
        met = v_goal["p99_ms"] <= P99_GOAL_MS and v_goal["lost"] == 0 \
            and v_goal["wrong"] + v_goal["dup"] + v_goal["wrong_id"] == 0
        lines.append("- Target p99 <= %.0f ms at %d subscribers through "
                     "virtmux: **%s** (p99 %s ms, max %s ms, %d events lost)."
                     % (P99_GOAL_MS, GOAL_N, "met" if met else "not met",
                        fmt(v_goal["p99_ms"]), fmt(v_goal["max_ms"], 1),
                        v_goal["lost"]))
    else:
        lines.append("- Target p99 <= %.0f ms at %d subscribers: not "
                     "measured in this run." % (P99_GOAL_MS, GOAL_N))
    vs = [summary[(n, "virtmux")] for n in subs if (n, "virtmux") in summary]
    ds = [summary[(n, "direct")] for n in subs if (n, "direct") in summary]
    if len(vs) >= 2 and base:
        lo, hi = vs[0], vs[-1]
        growth = above_base(hi, base) - above_base(lo, base)
        dgrowth = float("nan")
        if len(ds) >= 2:
            dgrowth = above_base(ds[-1], base) - above_base(ds[0], base)
        # "independent": from the fewest to the most subscribers, libvirtd's
        # CPU through virtmux grows by no more than 3 clock ticks or a tenth
        # of what the same growth costs it direct
        limit = max(3 * TICK, 0.1 * dgrowth if dgrowth == dgrowth else 0)
        lines.append(
            "- Target libvirtd CPU for event delivery independent of the "
            "subscriber count: **%s**. Through virtmux, libvirtd's CPU "
            "above the baseline (the controller's calls alone, %s s) was "
            "%s s at N=%d and %s s at N=%d (growth %s s; direct: %s s); "
            "CPU times have a resolution of %.0f ms per sample."
            % ("met" if growth <= limit else "not met",
               fmt(base["cpu_libvirtd"]), fmt(above_base(lo, base)), lo["n"],
               fmt(above_base(hi, base)), hi["n"], fmt(growth),
               fmt(dgrowth), TICK * 1e3))
    if len(ds) >= 2 and base:
        lo, hi = ds[0], ds[-1]
        lines.append(
            "- Direct, libvirtd's CPU above the baseline grows with the "
            "subscribers: %s s at N=%d, %s s at N=%d (each event is encoded "
            "and written once per subscriber)."
            % (fmt(above_base(lo, base)), lo["n"], fmt(above_base(hi, base)),
               hi["n"]))
    for n in subs:
        d, v = summary.get((n, "direct")), summary.get((n, "virtmux"))
        if not d or not v:
            continue
        lines.append(
            "- N=%d: p50 %s vs %s ms, p99 %s vs %s ms (virtmux vs direct); "
            "virtmux used %s s of CPU for %d deliveries (%s µs each), the "
            "subscriber processes %s s (virtmux run) and %s s (direct run)."
            % (n, fmt(v["p50_ms"]), fmt(d["p50_ms"]), fmt(v["p99_ms"]),
               fmt(d["p99_ms"]), fmt(v["cpu_virtmux"]), v["delivered"],
               fmt(v["cpu_virtmux"] / v["delivered"] * 1e6
                   if v["delivered"] else float("nan"), 1),
               fmt(v["cpu_subscribers"]), fmt(d["cpu_subscribers"])))
    others = [s["cpu_other"] / s["window_s"] * 100 for s in summary.values()
              if s["window_s"] > 0]
    if others and max(others) >= 10:
        lines.append("- Other processes used up to %s%% of one core during "
                     "some runs (\"other\" above): those cells are disturbed."
                     % fmt(max(others), 0))
    lines.append("- Everything shares %d CPUs: libvirtd, virtmux, the "
                 "subscriber processes (Python) and the controller. At large "
                 "N the subscribers' own parsing is part of the latency in "
                 "both columns." % ncpu)
    bad = sum(s["lost"] + s["wrong"] + s["dup"] + s["wrong_id"]
              for s in summary.values())
    lines.append("- Lost, out-of-order, duplicated or wrongly numbered "
                 "events over all runs: %d." % bad)
    return "\n".join(lines)


def _dedup_key(ln):
    return ln.split(" : ", 1)[-1] if " : " in ln else ln.split(" ", 1)[-1]


def _dedup(lines, limit):
    """Log lines without their timestamps, repeats counted."""
    return benchlib.count_repeats(lines, limit, _dedup_key)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", default="1,50,200",
                    help="comma-separated subscriber counts (default "
                         "1,50,200)")
    ap.add_argument("--flips", type=int, default=100,
                    help="suspend+resume pairs per run (default 100: 200 "
                         "events)")
    ap.add_argument("--pause-ms", type=float, default=20.0,
                    help="pause after every call (default 20)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; the target order alternates (default 3)")
    ap.add_argument("--procs", type=int, default=2,
                    help="subscriber processes the N subscribers are spread "
                         "over (default 2)")
    ap.add_argument("--virtmux", metavar="BINARY",
                    help="gateway binary (default build/proxy/virtmux)")
    ap.add_argument("--write", metavar="FILE",
                    help="write/replace the bench_events section in FILE")
    ap.add_argument("--keep-logs", metavar="DIR",
                    help="copy the virtmux and libvirtd logs to DIR")
    a = ap.parse_args(argv)
    a.subscribers = benchlib.int_list(ap, a.subscribers, "--subscribers")
    if (a.flips < 1 or a.pause_ms < 0 or a.rounds < 1 or a.procs < 1):
        ap.error("--flips >= 1, --pause-ms >= 0, --rounds >= 1, "
                 "--procs >= 1")
    if (a.flips > 2000 or a.rounds > 10 or max(a.subscribers) > 1000
            or a.pause_ms > 1000):
        ap.error("refusing an unbounded run (flips <= 2000, rounds <= 10, "
                 "subscribers <= 1000, pause <= 1000 ms)")
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source = benchlib.gateway_binary(args.virtmux)
    benchlib.check_prerequisites(NAME, source)
    with benchlib.binary_snapshot(source, "virtmux-bench-ev-") as binary:
        return run_benchmark(args, source, binary)


def run_benchmark(args, source, binary):
    import libvirt
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    command = shlex.join([sys.executable] + sys.argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    facts = benchlib.machine_facts(binary)
    load_before = benchlib.loadavg()
    t_begin = time.monotonic()

    # room for every direct subscriber
    lvd = harness.Libvirtd(name="bench-events",
                           extra_conf={"max_clients": 2000,
                                       "max_anonymous_clients": 2000})
    vmx = None
    ctl = None
    results = []
    aborted = None
    try:
        lvd.start()
        cfg = harness.make_config(
            [harness.upstream_entry("hv1", lvd.direct_uri)],
            default_upstream="hv1", admin=True,
            limits={"max_clients": 2000}, log={"level": "warn"})
        vmx = harness.Virtmux(cfg, binary=binary, verbose=False)
        vmx.start()
        ctl = libvirt.open(lvd.direct_uri)
        dom = ctl.lookupByName(DOMAIN)
        ports = {"direct": lvd.port, "virtmux": vmx.port}
        benchlib.print_setup(lvd, vmx, facts["cpu_count"], load_before)
        try:
            for rnd in range(args.rounds):
                plan = [("direct", 0)]
                for n in args.subscribers:
                    order = TARGETS if rnd % 2 == 0 else TARGETS[::-1]
                    plan.extend((t, n) for t in order)
                for target, n in plan:
                    r = run_one(target, ports[target], n, args, lvd, vmx,
                                dom, rnd)
                    results.append(r)
                    print("# round %d N=%-3d %-7s p50 %7.2f ms p99 %7.2f ms "
                          "max %7.1f ms  cpu libvirtd %.2f virtmux %.2f "
                          "subs %.2f other %.2f  lost %d wrong %d  "
                          "status %s libvirtd clients %s"
                          % (rnd, n, target, r["p50_ms"], r["p99_ms"],
                             r["max_ms"], r["cpu_libvirtd"],
                             r["cpu_virtmux"], r["cpu_subscribers"],
                             r["cpu_other"], r["lost"],
                             r["wrong"] + r["dup"] + r["wrong_id"],
                             r["vmx_status"], r["lvd_clients"]),
                          file=sys.stderr)
                    if not vmx.running():
                        raise BenchError("virtmux exited (%s) during round "
                                         "%d, N=%d, %s" % (
                                             vmx.proc.returncode, rnd, n,
                                             target))
                    if not lvd.running():
                        raise BenchError("libvirtd exited (%s)"
                                         % lvd.proc.returncode)
                    time.sleep(0.3)
        except (BenchError, harness.HarnessError) as e:
            aborted = str(e)
            print("# ABORTED: %s" % aborted, file=sys.stderr)
    finally:
        if ctl is not None:
            try:
                ctl.close()
            except libvirt.libvirtError:
                pass
        vmx_rc, vmx_log, lvd_log = benchlib.shut_down(vmx, lvd,
                                                      args.keep_logs)

    elapsed = time.monotonic() - t_begin
    summary = summarize(results)
    vmx_bad = [ln for ln in vmx_log.splitlines()
               if " warn " in ln or " error " in ln]
    lvd_bad = [ln for ln in lvd_log.splitlines() if " error : " in ln]
    procs = sorted({s["procs"] for s in summary.values() if s["n"]})

    body = []
    body.append("## `bench/bench_events.py`: event delivery, direct vs "
                "through virtmux")
    body.append("")
    body.append("N raw-protocol subscribers register for domain lifecycle "
                "events (CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY, no "
                "filter), straight to libvirtd (one registration per "
                "subscriber) or through virtmux (one upstream registration "
                "for all of them). A controller connected straight to "
                "libvirtd suspends and resumes the domain `test`; latency is "
                "the time a subscriber process read the event minus the "
                "time just before the call that caused it. Each round "
                "starts with a baseline run without subscribers: libvirtd's "
                "CPU for the controller's calls alone. Generated by the "
                "script; rerun it rather than editing the text between the "
                "markers.")
    body.append("")
    body.extend(benchlib.command_lines(command, started, elapsed))
    body.append("- Machine: %s CPUs, %s, kernel %s; load average before the "
                "run %s" % (facts["cpu_count"], facts["cpu"], facts["kernel"],
                            load_before))
    body.append("- `libvirtd --version`: %s; Python %s"
                % (facts["libvirtd"], facts["python"]))
    body.append("- virtmux: %s sha256 %s…; checkout HEAD %s%s; log.level "
                "warn; libvirtd: test driver only, TCP on 127.0.0.1, auth "
                "none" % (os.path.relpath(str(source), str(REPO))
                          if str(source).startswith(str(REPO))
                          else source, facts["binary_sha"], facts["commit"],
                          " with uncommitted changes in src/ or proxy/"
                          if facts["dirty"] else ""))
    body.append("- Method: %d suspend+resume pairs (%d events) per run, "
                "%.0f ms pause after every call; subscribers spread over %s "
                "process(es), each an epoll loop over raw sockets; %d "
                "round(s), target order alternating; cells are medians over "
                "the rounds (delivered/lost: sums). CPU is utime+stime from "
                "/proc/PID/stat from just before the first call until every "
                "subscriber had every event (\"window\"); \"other\" is the "
                "rest of the machine's busy time from /proc/stat."
                % (args.flips, 2 * args.flips, args.pause_ms,
                   "/".join(str(p) for p in procs) or "0", args.rounds))
    body.append("")
    body.append(main_table(summary, args.subscribers))
    body.append("")
    body.append(ratio_table(summary, args.subscribers))
    body.extend(benchlib.interpretation_head(aborted))
    body.append(interpretation(summary, args.subscribers, facts["cpu_count"]))
    eof = [ln for ln in lvd_bad if "End of file while reading data" in ln]
    body.append("- Logs: virtmux wrote %d warn/error line(s) and exited "
                "with status %s on SIGTERM; libvirtd logged %d error "
                "line(s)%s%s"
                % (len(vmx_bad), vmx_rc, len(lvd_bad),
                   " (%d of them \"End of file while reading data\": "
                   "sockets closed without CONNECT_CLOSE, i.e. the "
                   "harness's start-up probes, and virtmux's upstream links "
                   "at its shutdown)" % len(eof) if eof else "",
                   ":" if lvd_bad or vmx_bad else "."))
    shown = _dedup(vmx_bad, 5) + _dedup(lvd_bad, 5)
    if shown:
        body.append("")
        for ln in shown:
            body.append("      " + ln)
    body.extend(benchlib.details_lines("Every run", rounds_table(results)))
    text = "\n".join(body)
    print(text)
    if vmx_bad:
        print("\n# virtmux warn/error lines:")
        for ln in vmx_bad[:20]:
            print("#   " + ln)
    return benchlib.publish(args.write, NAME, text, aborted)


if __name__ == "__main__":
    benchlib.run_main(main, NAME)
