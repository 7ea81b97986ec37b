#!/usr/bin/python3
"""DOMAIN_GET_INFO throughput and cost: clients straight to libvirtd versus
the same clients through virtmux, side by side in one run.

One private libvirtd (test driver, loopback TCP) and one virtmux in front of
it are started with tests/e2e/harness.py. For every N in --clients and every
round, N client threads (spread over --procs client processes) each open
their own libvirt connection, look up the domain "test" and call dom.info()
in a closed loop: a warm-up, then a measured window of --seconds. The two
targets alternate their order from round to round and the median over the
rounds is reported for each (N, target).

Measured per run:
  * calls/s          calls completed inside the measured window
  * p50/p99/max      latency of those calls (time.perf_counter around info())
  * CPU seconds      utime+stime from /proc/PID/stat of libvirtd, virtmux and
                     the client processes over the window, plus the whole
                     machine's busy time from /proc/stat (the rest is "other")
  * connections      libvirtd's client count (virt-admin) while the clients
                     are still connected, and how many of those are virtmux's
                     upstream links (its sockets to the libvirtd port)

Run as root with /usr/bin/python3 (the interpreter with the libvirt module):

    /usr/bin/python3 bench/bench_getinfo.py --write docs/BENCHMARKS.md

All traffic stays on 127.0.0.1; every wait is bounded and every process that
is started is stopped in a finally block.
"""

import argparse
import datetime
import os
import shlex
import signal
import sys
import threading
import time
from array import array
from pathlib import Path

import benchlib
from benchlib import REPO, TARGETS, BenchError, fmt, harness, ratio

NAME = "bench_getinfo"
DOMAIN = "test"

OPEN_TIMEOUT = 60.0     # all client connections of a run open by then
STALL_GRACE = 10.0      # a call running this long after the window is stuck
CLOSE_TIMEOUT = 30.0
SLOW_CALL = 1.0         # seconds; calls at least this slow count as stalls


# --------------------------------------------------------------------------
# client processes
# --------------------------------------------------------------------------

class _Client:
    """State of one client thread (one libvirt connection)."""

    def __init__(self):
        self.conn = None
        self.dom = None
        self.open_error = None
        self.lat = array("d")
        self.errors = 0
        self.err_samples = []
        self.mismatches = 0
        self.slow = 0


def _client_thread(cl, uri, expected, opened, go, sched):
    import libvirt
    try:
        cl.conn = libvirt.open(uri)
        cl.dom = cl.conn.lookupByName(DOMAIN)
    except libvirt.libvirtError as e:
        cl.open_error = str(e)
    finally:
        opened.release()
    if cl.dom is None:
        return
    if not go.wait(OPEN_TIMEOUT + 30.0) or not sched:
        return
    warm_end, meas_end = sched
    info = cl.dom.info
    lat = cl.lat
    pc = time.perf_counter
    first = True
    while True:
        t0 = pc()
        try:
            value = info()
        except libvirt.libvirtError as e:
            t1 = pc()
            if warm_end <= t1 < meas_end:
                cl.errors += 1
                if len(cl.err_samples) < 3:
                    cl.err_samples.append(str(e))
            if t1 >= meas_end:
                break
            time.sleep(0.01)        # do not spin on a broken connection
            continue
        t1 = pc()
        if first:
            first = False
            if list(value[:4]) != list(expected):
                cl.mismatches += 1
        if t1 >= meas_end:
            break
        if t1 >= warm_end:
            d = t1 - t0
            lat.append(d)
            if d >= SLOW_CALL:
                cl.slow += 1


def client_process(uri, nthreads, expected, pipe):
    """Entry point of one client process (multiprocessing, spawn)."""
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

    clients = [_Client() for _ in range(nthreads)]
    opened = threading.Semaphore(0)
    go = threading.Event()
    sched = []
    threads = [threading.Thread(target=_client_thread,
                                args=(cl, uri, expected, opened, go, sched),
                                daemon=True)
               for cl in clients]
    for t in threads:
        t.start()
    deadline = time.monotonic() + OPEN_TIMEOUT
    nopened = 0
    for _ in clients:
        if not opened.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
        nopened += 1
    open_errors = [cl.open_error for cl in clients if cl.open_error]
    pipe.send(("ready", nopened, len(clients), open_errors[:3],
               sum(1 for cl in clients if cl.dom is not None)))

    if not pipe.poll(OPEN_TIMEOUT + 30.0):
        os._exit(3)
    msg = pipe.recv()
    if msg[0] != "go":
        go.set()
        os._exit(0)
    sched.extend(msg[1:3])
    go.set()
    meas_end = msg[2]

    stuck = 0
    for t in threads:
        remaining = meas_end + STALL_GRACE - time.perf_counter()
        t.join(max(0.0, remaining))
        if t.is_alive():
            stuck += 1
    lat = array("d")
    for cl in clients:
        lat.extend(cl.lat)
    err_samples = []
    for cl in clients:
        err_samples.extend(cl.err_samples)
    pipe.send(("result", lat.tobytes(),
               sum(cl.errors for cl in clients), err_samples[:5],
               sum(cl.mismatches for cl in clients),
               sum(cl.slow for cl in clients), stuck))

    if pipe.poll(OPEN_TIMEOUT):
        pipe.recv()                 # "close": the parent has counted clients
    if stuck:
        os._exit(2)                 # a stuck libvirt call would block close()
    close_errors = 0
    for cl in clients:
        if cl.conn is not None:
            try:
                cl.conn.close()
            except libvirt.libvirtError:
                close_errors += 1
    pipe.send(("closed", close_errors))
    pipe.close()


# --------------------------------------------------------------------------
# /proc: threads and sockets (CPU sampling is in benchlib)
# --------------------------------------------------------------------------

def task_name(pid, tid):
    try:
        with open("/proc/%d/task/%d/comm" % (pid, tid)) as f:
            return f.read().strip()
    except OSError:
        return "?"


def busiest_thread(pid, before, after):
    """(thread name, CPU seconds) of the thread of pid that used the most
    CPU between two benchlib.task_cpus() samples."""
    best = None
    for tid, cpu in after.items():
        d = cpu - before.get(tid, 0.0)
        if best is None or d > best[1]:
            best = (tid, d)
    if best is None:
        return ("?", 0.0)
    return (task_name(pid, best[0]), best[1])


def socket_inodes(pid):
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_links_to(pid, port):
    """Established TCP sockets of process pid whose peer is 127.0.0.1:port."""
    inodes = socket_inodes(pid)
    count = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                rem_port = int(cols[2].rsplit(":", 1)[1], 16)
                if rem_port == port and cols[3] == "01" and cols[9] in inodes:
                    count += 1
    except OSError:
        return None
    return count


# --------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------

def run_one(target, uri, nclients, args, lvd, vmx, expected, rnd):
    split = benchlib.split_evenly(nclients, max(1, min(args.procs, nclients)))
    workers = []
    try:
        benchlib.start_workers(workers, client_process,
                               [(uri, k, expected) for k in split])

        deadline = time.monotonic() + OPEN_TIMEOUT + 15.0
        open_errors = []
        for p, pipe in workers:
            _, nopened, nthreads, errs, ndom = benchlib.recv_message(
                pipe, deadline, "ready")
            open_errors.extend(errs)
            if ndom != nthreads:
                raise BenchError(
                    "%s N=%d: only %d of %d client connections opened "
                    "(%d answered): %s" % (target, nclients, ndom, nthreads,
                                           nopened, open_errors[:3]))

        pids = {"libvirtd": [lvd.proc.pid], "virtmux": [vmx.proc.pid],
                "clients": [p.pid for p, _ in workers]}
        start = time.perf_counter() + 0.05
        warm_end = start + args.warmup
        meas_end = warm_end + args.seconds
        for _, pipe in workers:
            pipe.send(("go", warm_end, meas_end))

        time.sleep(max(0.0, warm_end - time.perf_counter()))
        s0 = benchlib.cpu_sample(pids, ("libvirtd", "virtmux"))
        time.sleep(max(0.0, meas_end - time.perf_counter()))
        s1 = benchlib.cpu_sample(pids, ("libvirtd", "virtmux"))
        top = {name: busiest_thread(pids[name][0], s0["tasks"][name],
                                    s1["tasks"][name])
               for name in ("libvirtd", "virtmux")}
        nthreads = {name: len(s1["tasks"][name])
                    for name in ("libvirtd", "virtmux")}

        deadline = time.monotonic() + args.seconds + STALL_GRACE + 15.0
        lat = array("d")
        errors = mismatches = slow = stuck = 0
        err_samples = []
        for _, pipe in workers:
            _, raw, e, es, mm, sl, st = benchlib.recv_message(
                pipe, deadline, "result")
            chunk = array("d")
            chunk.frombytes(raw)
            lat.extend(chunk)
            errors += e
            err_samples.extend(es)
            mismatches += mm
            slow += sl
            stuck += st

        # connections are still open: what does libvirtd see?
        try:
            lvd_clients = lvd.nclients()
        except harness.HarnessError:
            lvd_clients = None
        vmx_links = tcp_links_to(vmx.proc.pid, lvd.port)

        for _, pipe in workers:
            pipe.send(("close",))
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for p, pipe in workers:
            if stuck:
                break
            try:
                benchlib.recv_message(pipe, deadline, "closed")
            except BenchError:
                pass
    finally:
        benchlib.stop_workers(workers)

    window = s1["t"] - s0["t"]
    cpu = {k: s1["cpu"][k] - s0["cpu"][k] for k in s0["cpu"]}
    busy = s1["busy"] - s0["busy"]
    lat_sorted = sorted(lat)
    calls = len(lat_sorted)
    res = {
        "round": rnd, "target": target, "n": nclients, "procs": len(split),
        "window_s": window, "calls": calls,
        "calls_per_s": calls / args.seconds,
        "p50_ms": benchlib.percentile(lat_sorted, 50) * 1e3,
        "p99_ms": benchlib.percentile(lat_sorted, 99) * 1e3,
        "max_ms": (lat_sorted[-1] * 1e3) if lat_sorted else float("nan"),
        "errors": errors, "err_samples": err_samples,
        "mismatches": mismatches, "slow": slow, "stuck": stuck,
        "cpu_libvirtd": cpu["libvirtd"], "cpu_virtmux": cpu["virtmux"],
        "cpu_clients": cpu["clients"], "cpu_busy": busy,
        "cpu_other": max(0.0, busy - sum(cpu.values())),
        "cpu_irq": s1["irq"] - s0["irq"],
        "lvd_top_name": top["libvirtd"][0], "lvd_top": top["libvirtd"][1],
        "vmx_top_name": top["virtmux"][0], "vmx_top": top["virtmux"][1],
        "lvd_threads": nthreads["libvirtd"],
        "vmx_threads": nthreads["virtmux"],
        "lvd_clients": lvd_clients, "vmx_links": vmx_links,
    }
    for k in ("libvirtd", "virtmux", "clients"):
        res["cpu1k_" + k] = (cpu[k] / calls * 1000.0 if calls
                             else float("nan"))
    res["cpu1k_busy"] = (busy / calls * 1000.0) if calls else float("nan")
    return res


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------

MEDIAN_KEYS = ("calls_per_s", "p50_ms", "p99_ms", "max_ms", "cpu_libvirtd",
               "cpu_virtmux", "cpu_clients", "cpu_busy", "cpu_other",
               "cpu_irq",
               "lvd_top", "vmx_top",
               "cpu1k_libvirtd", "cpu1k_virtmux", "cpu1k_clients",
               "cpu1k_busy",
               "window_s")
SUM_KEYS = ("calls", "errors", "mismatches", "slow", "stuck")


def summarize(results):
    return benchlib.summarize_rounds(
        results, MEDIAN_KEYS, SUM_KEYS,
        first_keys=("procs", "lvd_top_name", "vmx_top_name", "lvd_threads",
                    "vmx_threads"),
        max_keys=("lvd_clients", "vmx_links"))


def pct(cpu_s, window):
    return 100.0 * cpu_s / window if window > 0 else float("nan")


def main_table(summary, clients):
    out = []
    out.append("| N | target | calls/s | p50 ms | p99 ms | max ms "
               "| libvirtd CPU s (% core) | virtmux CPU s (% core) "
               "| clients CPU s (% core) | other CPU s "
               "| libvirtd CPU ms/1k calls | virtmux CPU ms/1k calls "
               "| clients CPU ms/1k calls | libvirtd clients (virtmux links) "
               "| errors |")
    out.append("|" + "---|" * 15)
    for n in clients:
        for t in TARGETS:
            s = summary.get((n, t))
            if not s:
                continue
            w = s["window_s"]
            conns = "%s (%s)" % (fmt(s["lvd_clients"], 0)
                                 if s["lvd_clients"] is not None else "n/a",
                                 s["vmx_links"] if s["vmx_links"] is not None
                                 else "n/a")
            out.append(
                "| %d | %s | %s | %s | %s | %s | %s (%s%%) | %s (%s%%) "
                "| %s (%s%%) | %s | %s | %s | %s | %s | %d |"
                % (n, t, fmt(s["calls_per_s"], 0), fmt(s["p50_ms"], 3),
                   fmt(s["p99_ms"], 3), fmt(s["max_ms"], 1),
                   fmt(s["cpu_libvirtd"]), fmt(pct(s["cpu_libvirtd"], w), 0),
                   fmt(s["cpu_virtmux"]), fmt(pct(s["cpu_virtmux"], w), 0),
                   fmt(s["cpu_clients"]), fmt(pct(s["cpu_clients"], w), 0),
                   fmt(s["cpu_other"]),
                   fmt(s["cpu1k_libvirtd"] * 1e3, 1),
                   fmt(s["cpu1k_virtmux"] * 1e3, 1),
                   fmt(s["cpu1k_clients"] * 1e3, 1),
                   conns, s["errors"]))
    return "\n".join(out)


def ratio_table(summary, clients):
    out = ["| N | calls/s virtmux/direct | libvirtd CPU per call "
           "virtmux/direct | p99 virtmux/direct |",
           "|---|---|---|---|"]
    for n in clients:
        d, v = summary.get((n, "direct")), summary.get((n, "virtmux"))
        if not d or not v:
            continue
        out.append("| %d | %s× | %s× | %s× |" % (
            n, fmt(ratio(v["calls_per_s"], d["calls_per_s"])),
            fmt(ratio(v["cpu1k_libvirtd"], d["cpu1k_libvirtd"])),
            fmt(ratio(v["p99_ms"], d["p99_ms"]))))
    return "\n".join(out)


def rounds_table(results):
    out = ["| round | N | target | calls/s | p50 ms | p99 ms "
           "| libvirtd CPU s | libvirtd busiest thread CPU s "
           "| virtmux CPU s | clients CPU s | other CPU s "
           "| irq+softirq s (machine) | max ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        out.append("| %d | %d | %s | %s | %s | %s | %s | %s (%s) | %s | %s "
                   "| %s | %s | %s |" % (
                       r["round"], r["n"], r["target"],
                       fmt(r["calls_per_s"], 0), fmt(r["p50_ms"], 3),
                       fmt(r["p99_ms"], 3), fmt(r["cpu_libvirtd"]),
                       fmt(r["lvd_top"]), r["lvd_top_name"],
                       fmt(r["cpu_virtmux"]), fmt(r["cpu_clients"]),
                       fmt(r["cpu_other"]), fmt(r["cpu_irq"]),
                       fmt(r["max_ms"], 1)))
    return "\n".join(out)


def interpretation(summary, clients, ncpu, target_n=64, goal=1.3):
    lines = []
    for n in clients:
        d, v = summary.get((n, "direct")), summary.get((n, "virtmux"))
        if not d or not v:
            continue
        r = ratio(v["calls_per_s"], d["calls_per_s"])
        cpu_d = d["cpu1k_libvirtd"] + d["cpu1k_clients"]
        cpu_v = (v["cpu1k_libvirtd"] + v["cpu1k_virtmux"]
                 + v["cpu1k_clients"])
        lines.append(
            "- N=%d: virtmux delivers %s× the direct throughput "
            "(%s vs %s calls/s). CPU per 1000 calls, libvirtd + virtmux + "
            "clients: %s ms through virtmux vs %s ms direct "
            "(libvirtd alone: %s vs %s ms)."
            % (n, fmt(r), fmt(v["calls_per_s"], 0), fmt(d["calls_per_s"], 0),
               fmt(cpu_v * 1e3, 1), fmt(cpu_d * 1e3, 1),
               fmt(v["cpu1k_libvirtd"] * 1e3, 1),
               fmt(d["cpu1k_libvirtd"] * 1e3, 1)))
        for s in (d, v):
            w = s["window_s"]
            parts = [("libvirtd", s["cpu_libvirtd"]),
                     ("virtmux", s["cpu_virtmux"]),
                     ("clients", s["cpu_clients"]),
                     ("other processes", s["cpu_other"])]
            top = max(parts, key=lambda p: p[1])
            lines.append(
                "  - %s: machine %s%% busy of %d%% (%d CPUs); libvirtd %s%% "
                "(%d threads, busiest `%s` %s%%), virtmux %s%%, clients %s%%, "
                "other %s%% of one core; the busiest process is %s."
                % (s["target"], fmt(pct(s["cpu_busy"], w), 0), 100 * ncpu,
                   ncpu, fmt(pct(s["cpu_libvirtd"], w), 0),
                   s["lvd_threads"], s["lvd_top_name"],
                   fmt(pct(s["lvd_top"], w), 0),
                   fmt(pct(s["cpu_virtmux"], w), 0),
                   fmt(pct(s["cpu_clients"], w), 0),
                   fmt(pct(s["cpu_other"], w), 0), top[0]))
    nmax = max((n for n in clients if (n, "direct") in summary
                and (n, "virtmux") in summary), default=None)
    if nmax is not None:
        d, v = summary[(nmax, "direct")], summary[(nmax, "virtmux")]
        busy_d = pct(d["cpu_busy"], d["window_s"]) / (100.0 * ncpu)
        busy_v = pct(v["cpu_busy"], v["window_s"]) / (100.0 * ncpu)
        per_d = d["cpu1k_busy"] / 1000.0
        per_v = v["cpu1k_busy"] / 1000.0
        low = min(busy_d, busy_v)
        if low >= 0.9:
            state = "CPU-bound: throughput is roughly CPUs / (CPU per call)"
        elif low >= 0.7:
            state = ("close to CPU-bound, so CPU per call explains most of "
                     "the difference")
        else:
            state = ("not CPU-bound: latency (the extra hop, and queueing "
                     "for the pool's slots in virtmux) limits throughput "
                     "more than CPU")
        lines.append(
            "- Bottleneck at N=%d: the %d CPUs were %s%% (direct) and %s%% "
            "(virtmux) busy, i.e. %s. Machine CPU per 1000 calls: %s ms "
            "through virtmux vs %s ms direct; if CPU were the only limit "
            "the throughput ratio would be %s×, measured %s×. libvirtd's "
            "own "
            "CPU per call through virtmux is %s× the direct one: funnelling "
            "%d client connections into %s upstream links did not make "
            "libvirtd cheaper per call, and virtmux adds %s ms of its own "
            "CPU per 1000 calls."
            % (nmax, ncpu, fmt(busy_d * 100, 0), fmt(busy_v * 100, 0), state,
               fmt(per_v * 1e6, 1), fmt(per_d * 1e6, 1),
               fmt(ratio(per_d, per_v)),
               fmt(ratio(v["calls_per_s"], d["calls_per_s"])),
               fmt(ratio(v["cpu1k_libvirtd"], d["cpu1k_libvirtd"])),
               nmax, v["vmx_links"] if v["vmx_links"] is not None else "n/a",
               fmt(v["cpu1k_virtmux"] * 1e3, 1)))
        lvd_core = pct(d["lvd_top"], d["window_s"])
        if lvd_core >= 90:
            lines.append(
                "- libvirtd's busiest thread (`%s`) was at %s%% of one core "
                "in the direct run at N=%d: a single libvirtd thread is "
                "saturated there." % (d["lvd_top_name"], fmt(lvd_core, 0),
                                      nmax))
        vm_core = pct(v["cpu_virtmux"], v["window_s"])
        lines.append(
            "- virtmux runs one event loop (one thread): at N=%d it used "
            "%s%% of one core, so it is %s."
            % (nmax, fmt(vm_core, 0),
               "saturated: it is the bottleneck" if vm_core >= 90
               else "not the saturated component"))
        cl_core = max(pct(d["cpu_clients"], d["window_s"]) / d["procs"],
                      pct(v["cpu_clients"], v["window_s"]) / v["procs"])
        lines.append(
            "- Client side: %d client process(es) at N=%d, at most %s%% of "
            "one core per process (a Python process's GIL caps it near "
            "100%%); %s."
            % (v["procs"], nmax, fmt(cl_core, 0),
               "the client is saturated, try --procs" if cl_core >= 90
               else "the client process is not saturated, but its CPU is "
                    "taken from the same cores libvirtd and virtmux need"))
    others = [pct(s["cpu_other"], s["window_s"]) for s in summary.values()]
    if others and max(others) >= 10:
        lines.append(
            "- Other processes on the machine used up to %s%% of one core "
            "during some windows (see \"other\" in the "
            "rounds table); those cells are disturbed, and the median over "
            "the rounds only partly corrects for it." % fmt(max(others), 0))
    d = summary.get((target_n, "direct"))
    v = summary.get((target_n, "virtmux"))
    if d and v:
        r = ratio(v["calls_per_s"], d["calls_per_s"])
        if r >= goal:
            lines.append("- Target (N=%d through virtmux >= %.1f× direct): "
                         "**met** (%s×)." % (target_n, goal, fmt(r)))
        else:
            lines.append("- Target (N=%d through virtmux >= %.1f× direct): "
                         "**not met** (%s×)." % (target_n, goal, fmt(r)))
    else:
        lines.append("- Target (N=%d through virtmux >= %.1f× direct): not "
                     "measured in this run." % (target_n, goal))
    errs = sum(s["errors"] + s["stuck"] + s["mismatches"]
               for s in summary.values())
    slow = sum(s["slow"] for s in summary.values())
    lines.append("- Errors, wrong answers or stuck calls during the measured "
                 "windows: %d; calls slower than %.0f s: %d."
                 % (errs, SLOW_CALL, slow))
    return "\n".join(lines)


def exit_text(rc):
    if rc is None:
        return "is running"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "signal %d" % -rc
        return "was killed by signal %d (%s)" % (-rc, name)
    return "exited with status %d" % rc


def log_lines(text, levels=("warn", "error")):
    out = []
    for line in text.splitlines():
        fields = line.split(None, 2)
        if len(fields) >= 2 and fields[1] in levels:
            out.append(line)
    return out


def _relpath(p):
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def _dedup_key(ln):
    if " error : " in ln:               # libvirtd: "TS: PID: error : ..."
        return ln.split(" error : ", 1)[1]
    parts = ln.split(None, 1)           # virtmux: "TS LEVEL OBJ: MSG"
    return parts[1] if len(parts) > 1 else ln


def _dedup(lines, limit):
    """Log lines without their timestamp, identical ones counted."""
    return benchlib.count_repeats(lines, limit, _dedup_key)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,64",
                    help="comma-separated client counts (default 1,64)")
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="measured window per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="warm-up before each window (default 1)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; the target order alternates (default 2)")
    ap.add_argument("--procs", type=int, default=1,
                    help="client processes the N threads are spread over "
                         "(default 1)")
    ap.add_argument("--max-connections", type=int, default=4,
                    help="virtmux pool max_connections (default 4)")
    ap.add_argument("--max-inflight", type=int, default=4,
                    help="virtmux pool max_inflight (default 4)")
    ap.add_argument("--virtmux", metavar="BINARY",
                    help="gateway binary (default: build/proxy/virtmux, or "
                         "$VIRTMUX_BUILD/proxy/virtmux)")
    ap.add_argument("--write", metavar="FILE",
                    help="write/replace the results section in FILE")
    ap.add_argument("--keep-logs", metavar="DIR",
                    help="copy the virtmux and libvirtd logs to DIR")
    a = ap.parse_args(argv)
    a.clients = benchlib.int_list(ap, a.clients, "--clients")
    if a.seconds <= 0 or a.warmup < 0 or a.rounds < 1 or a.procs < 1:
        ap.error("--seconds > 0, --warmup >= 0, --rounds >= 1, --procs >= 1")
    if a.seconds > 120 or a.rounds > 20 or max(a.clients) > 1000:
        ap.error("refusing an unbounded run (seconds <= 120, rounds <= 20, "
                 "clients <= 1000)")
    return a


def check_prerequisites(source):
    more = []
    impl = time.get_clock_info("perf_counter").implementation
    if "CLOCK_MONOTONIC" not in impl:
        more.append("perf_counter is %s, not shared between processes"
                    % impl)
    benchlib.check_prerequisites(NAME, source, more)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source = benchlib.gateway_binary(args.virtmux)
    check_prerequisites(source)
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

    with benchlib.binary_snapshot(source, "virtmux-bench-bin-") as binary:
        return run_benchmark(args, source, binary)


def run_benchmark(args, source, binary):
    import libvirt
    command = shlex.join([sys.executable] + sys.argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    facts = benchlib.machine_facts(binary,
                                   dirty_paths=("src", "proxy", "meson.build"))
    facts["binary"] = str(source)
    load_before = benchlib.loadavg()
    b0, t0 = benchlib.machine_busy(), time.perf_counter()
    time.sleep(1.0)
    idle_busy = (benchlib.machine_busy() - b0) / (time.perf_counter() - t0)
    t_begin = time.monotonic()

    lvd = harness.Libvirtd(name="bench")
    vmx = None
    results = []
    vmx_log_run = lvd_log_run = ""
    vmx_alive = False
    final_lvd_clients = None
    aborted = None
    try:
        lvd.start()
        cfg = harness.make_config(
            [harness.upstream_entry("hv1", lvd.direct_uri,
                                    max_connections=args.max_connections,
                                    max_inflight=args.max_inflight,
                                    # the forwarding path, not sharing identical calls
                                    coalesce=False)],
            default_upstream="hv1")
        cfg["log"] = {"level": "warn"}
        vmx = harness.Virtmux(cfg, binary=binary, verbose=False)
        vmx.start()
        uris = {"direct": lvd.direct_uri, "virtmux": vmx.uri()}

        # both targets must answer, and answer the same
        expected = {}
        for t, uri in uris.items():
            conn = libvirt.open(uri)
            try:
                expected[t] = list(conn.lookupByName(DOMAIN).info()[:4])
            finally:
                conn.close()
        if expected["direct"] != expected["virtmux"]:
            raise BenchError("direct and virtmux disagree: %r" % expected)

        benchlib.print_setup(lvd, vmx, facts["nproc"], load_before)
        try:
            for rnd in range(args.rounds):
                for n in args.clients:
                    order = TARGETS if rnd % 2 == 0 else TARGETS[::-1]
                    for t in order:
                        r = run_one(t, uris[t], n, args, lvd, vmx,
                                    expected["direct"], rnd)
                        results.append(r)
                        print("# round %d N=%d %-7s %8.0f calls/s p50 %.3f ms "
                              "p99 %.3f ms  cpu libvirtd %.2f virtmux %.2f "
                              "clients %.2f other %.2f  errors %d  "
                              "libvirtd clients %s (virtmux links %s)"
                              % (rnd, n, t, r["calls_per_s"], r["p50_ms"],
                                 r["p99_ms"], r["cpu_libvirtd"],
                                 r["cpu_virtmux"],
                                 r["cpu_clients"], r["cpu_other"], r["errors"],
                                 r["lvd_clients"], r["vmx_links"]),
                              file=sys.stderr)
                        for e in r["err_samples"]:
                            print("#   error: %s" % e, file=sys.stderr)
                        if not vmx.running():
                            raise BenchError("virtmux %s during round %d, "
                                             "N=%d, target %s (or just "
                                             "before)"
                                             % (exit_text(vmx.proc.returncode),
                                                rnd, n, t))
                        if not lvd.running():
                            raise BenchError("libvirtd %s"
                                             % exit_text(lvd.proc.returncode))
        except BenchError as e:
            aborted = str(e)
            print("# ABORTED: %s" % aborted, file=sys.stderr)
        try:
            final_lvd_clients = lvd.nclients()
        except harness.HarnessError:
            pass
        vmx_alive = vmx.running()
    finally:
        # what was logged before the shutdown began, and in total
        if vmx is not None:
            vmx_log_run = vmx.log_text()
        lvd_log_run = lvd.log_text()
        vmx_rc, vmx_log, lvd_log = benchlib.shut_down(vmx, lvd,
                                                      args.keep_logs)

    elapsed = time.monotonic() - t_begin
    summary = summarize(results)
    vmx_bad = log_lines(vmx_log)
    vmx_bad_run = log_lines(vmx_log_run)
    lvd_bad = [ln for ln in lvd_log.splitlines() if " error : " in ln]
    lvd_bad_run = [ln for ln in lvd_log_run.splitlines() if " error : " in ln]

    procs_used = sorted({s["procs"] for s in summary.values()})
    body = []
    body.append("## DOMAIN_GET_INFO: direct vs through virtmux")
    body.append("")
    body.extend(benchlib.command_lines(command, started, elapsed))
    body.append("- Machine: %s CPUs (`nproc`), %s, kernel %s; load average "
                "before the run %s, CPU busy in the second before it %s%% of "
                "one core" % (facts["nproc"], facts["cpu"], facts["kernel"],
                              load_before, fmt(idle_busy * 100, 0)))
    body.append("- `libvirtd --version`: %s; python libvirt %s; Python %s"
                % (facts["libvirtd"], facts["libvirt_python"],
                   facts["python"]))
    body.append("- virtmux: %s sha256 %s… built %s UTC; "
                "checkout HEAD %s%s"
                % (_relpath(facts["binary"]), facts["binary_sha"],
                   facts["binary_mtime"],
                   facts["commit"],
                   " with uncommitted changes in src/ or proxy/"
                   if facts.get("dirty") else ""))
    body.append("- virtmux: one TCP listener on 127.0.0.1, upstream `hv1` = "
                "`%s`, pool max_connections %d, max_inflight %d, log.level "
                "warn. libvirtd: test driver only, TCP on 127.0.0.1, "
                "auth none." % ("test+tcp://127.0.0.1:PORT/default",
                               args.max_connections, args.max_inflight))
    body.append("- Method: N client threads spread over %s client "
                "process(es) (spawned with multiprocessing; python threads, "
                "libvirt releases the GIL "
                "during a call), one libvirt connection each, "
                "`lookupByName('%s')` then `dom.info()` in a closed loop; "
                "%.0f s warm-up, %.0f s measured window; %d round(s) with the "
                "target order alternating; each cell is the median over "
                "the rounds (errors: sum). CPU is utime+stime from "
                "/proc/PID/stat over the window; \"other\" is the rest of "
                "the machine's busy time from /proc/stat (other processes, "
                "interrupts). \"libvirtd clients\" is virt-admin's nclients "
                "at the end of the window, with the clients still "
                "connected; in brackets, how many of those sockets belong "
                "to virtmux (its pool keeps idle links between runs, so "
                "they also appear in the direct rows)."
                % ("/".join(str(p) for p in procs_used), DOMAIN,
                   args.warmup, args.seconds, args.rounds))
    body.append("")
    body.append(main_table(summary, args.clients))
    body.append("")
    body.append(ratio_table(summary, args.clients))
    body.extend(benchlib.interpretation_head(aborted))
    body.append(interpretation(summary, args.clients, facts["nproc"]))
    body.append("- The client processes, libvirtd and virtmux share the "
                "same %s CPUs (no pinning), so the clients' own CPU per call "
                "is part of every result." % facts["nproc"])
    if vmx_alive:
        shutdown = ("exited with status 0" if vmx_rc == 0
                    else "**%s**" % exit_text(vmx_rc))
        state = "was running at the end of the run and, on SIGTERM, " \
            + shutdown
    else:
        state = "**had stopped before the end of the run** (%s)" % (
            exit_text(vmx.proc.returncode if vmx and vmx.proc else None))
    body.append("- Logs: virtmux wrote %d warn/error line(s) while the "
                "benchmark ran and %d during its SIGTERM shutdown; libvirtd "
                "logged %d error(s) while the benchmark ran (start-up "
                "included) and %d during the shutdown. virtmux %s. libvirtd "
                "clients once all benchmark clients had closed (virtmux's "
                "idle pool links): %s."
                % (len(vmx_bad_run), len(vmx_bad) - len(vmx_bad_run),
                   len(lvd_bad_run), len(lvd_bad) - len(lvd_bad_run), state,
                   final_lvd_clients if final_lvd_clients is not None
                   else "n/a"))
    shown = _dedup(vmx_bad_run, 6) + [
        ln + " (shutdown)" for ln in _dedup(vmx_bad[len(vmx_bad_run):], 3)]
    if shown:
        body.append("")
        body.append("  virtmux warn/error lines (timestamps dropped, repeats "
                    "counted):")
        body.append("")
        for ln in shown:
            body.append("      " + ln)
    shown = _dedup(lvd_bad, 4)
    if shown:
        body.append("")
        body.append("  libvirtd error lines:")
        body.append("")
        for ln in shown:
            body.append("      " + ln)
    body.extend(benchlib.details_lines("Every round", rounds_table(results)))
    text = "\n".join(body)

    print(text)
    if vmx_bad:
        print("\n# virtmux warn/error log lines (%d, of which %d before "
              "shutdown):" % (len(vmx_bad), len(vmx_bad_run)))
        for ln in vmx_bad[:40]:
            print("#   " + ln)
    if lvd_bad:
        print("\n# libvirtd error log lines (%d, of which %d before "
              "shutdown):" % (len(lvd_bad), len(lvd_bad_run)))
        for ln in lvd_bad[:20]:
            print("#   " + ln)
    return benchlib.publish(args.write, NAME, text, aborted)


if __name__ == "__main__":
    benchlib.run_main(main, NAME)
