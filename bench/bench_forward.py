#!/usr/bin/python3
"""The forwarding path: DOMAIN_GET_INFO straight to libvirtd, through virtmux
(TCP upstream and UNIX upstream) and through HAProxy in TCP mode (a blind
relay: the cost of one extra hop and nothing else), side by side in one run.

The client is bench/loadgen (C, epoll, one thread), so the client side costs
little next to what is measured. One private libvirtd (test driver,
max_client_requests raised) serves four targets that are all up at once:

    direct     loadgen ── TCP ──> libvirtd
    vm-tcp     loadgen ── TCP ──> virtmux ── TCP  ──> libvirtd
    vm-unix    loadgen ── TCP ──> virtmux ── UNIX ──> libvirtd
    haproxy    loadgen ── TCP ──> haproxy (mode tcp, 1 thread) ── TCP ──> libvirtd

Three passes:
  1. rounds: every (connections, depth) case against every target, the
     target order rotating from round to round; medians over the rounds of
     calls/s, p50/p99 and CPU microseconds per call of the relay
     (utime+stime from /proc/PID/stat over loadgen's measured window)
  2. syscalls: one more run per (case, relay) with
     `perf stat -e raw_syscalls:sys_enter -p PID` inside the window;
     syscalls per forwarded call = count / (perf's seconds * calls/s)
  3. instructions: a second copy of each relay under
     `valgrind --tool=callgrind`, counters zeroed and dumped around two
     loadgen runs of different lengths (-n); instructions per forwarded call
     = difference of the totals / difference of the calls, so that session
     set-up and teardown cancel out

Run as root from the repository root (not part of CI):

    /usr/bin/python3 bench/bench_forward.py --write docs/BENCHMARKS.md

haproxy is installed with apt-get if missing (a message says so); perf and
valgrind are optional: without them their rows say n/a.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import REPO, BenchError, fmt, harness, ratio

NAME = "bench_forward"
RELAYS = ("vm-tcp", "vm-unix", "haproxy")
TARGETS = ("direct",) + RELAYS
LABEL = {"direct": "direct", "vm-tcp": "virtmux, TCP upstream",
         "vm-unix": "virtmux, UNIX upstream", "haproxy": "HAProxy (tcp mode)"}
PERF = shutil.which("perf")
VALGRIND = shutil.which("valgrind")
CALLGRIND_CONTROL = shutil.which("callgrind_control")


# --------------------------------------------------------------------------
# the relays
# --------------------------------------------------------------------------

class HAProxy:
    """haproxy -db (foreground) with one frontend relaying to libvirtd's TCP
    port; `wrapper` runs it under another program (callgrind)."""

    def __init__(self, upstream_port, wrapper=()):
        self.port = harness.free_port()
        self.tmpdir = tempfile.mkdtemp(prefix="virtmux-haproxy-")
        self.cfg = os.path.join(self.tmpdir, "haproxy.cfg")
        self.log_path = os.path.join(self.tmpdir, "haproxy.log")
        with open(self.cfg, "w") as f:
            f.write("global\n    maxconn 4096\n    nbthread 1\n\n"
                    "defaults\n    mode tcp\n    timeout connect 5s\n"
                    "    timeout client 300s\n    timeout server 300s\n\n"
                    "listen relay\n    bind 127.0.0.1:%d\n"
                    "    server libvirtd 127.0.0.1:%d\n"
                    % (self.port, upstream_port))
        self.argv = list(wrapper) + [HAPROXY, "-db", "-f", self.cfg]
        self.proc = None

    def start(self, timeout=60.0):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        if not harness.wait_until(
                lambda: self.proc.poll() is not None
                or harness.tcp_accepts("127.0.0.1", self.port), timeout):
            raise BenchError("haproxy did not listen within %.0f s" % timeout)
        if self.proc.poll() is not None:
            raise BenchError("haproxy exited with %s: %s" % (
                self.proc.returncode, harness.tail(self.log_path, 10)))
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def ensure_haproxy():
    """Install Debian's haproxy if it is missing (benchmark-only package)."""
    global HAPROXY
    if os.access(HAPROXY, os.X_OK):
        return
    print("# haproxy is missing: installing the Debian package for the "
          "blind-relay baseline (apt-get install haproxy)", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                        "haproxy"], env=env, capture_output=True, text=True)
    HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if r.returncode != 0 or not os.access(HAPROXY, os.X_OK):
        raise BenchError("could not install haproxy: %s" % r.stderr[-400:])


def gateway_config(upstream_uri, args):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", upstream_uri,
                                max_connections=args.max_connections,
                                max_inflight=args.max_inflight,
                                # the forwarding path, not sharing identical calls
                                coalesce=False)],
        default_upstream="hv1",
        limits={"max_client_requests": 64})
    cfg["log"] = {"level": "warn"}
    return cfg


def callgrind_wrapper(outdir):
    """argv prefix that runs a program under callgrind, dumps in outdir."""
    return [VALGRIND, "--tool=callgrind",
            "--callgrind-out-file=%s/cg.%%p" % outdir]


def write_wrapper(path, prefix, binary):
    """A script at path that execs binary under prefix (harness.Virtmux
    runs whatever binary it is given)."""
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec %s %s \"$@\"\n"
                % (" ".join(shlex.quote(a) for a in prefix),
                   shlex.quote(str(binary))))
    os.chmod(path, 0o755)


# --------------------------------------------------------------------------
# one loadgen run
# --------------------------------------------------------------------------

def loadgen(lg, port, conns, depth, seconds, warmup, pids=(), calls=None,
            timeout=None):
    """Run loadgen against 127.0.0.1:port; returns its JSON report. A run
    with errors is a benchmark failure."""
    argv = [str(lg), "--uri-tcp", "127.0.0.1:%d" % port, "-c", str(conns),
            "-d", str(depth), "-t", str(seconds), "--warmup", str(warmup),
            "--proc", "getinfo"]
    if calls:
        argv += ["-n", str(calls)]
    for name, pid in pids:
        argv += ["--pid", "%s=%d" % (name, pid)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True,
                           timeout=timeout or (seconds + warmup + 60))
    except subprocess.TimeoutExpired:
        raise BenchError("loadgen hung: %s" % " ".join(argv))
    try:
        rep = json.loads(r.stdout)
    except ValueError:
        raise BenchError("loadgen printed no report (exit %d): %s"
                         % (r.returncode, r.stderr.strip()[-300:]))
    if rep["errors"] or not rep["calls"]:
        raise BenchError("loadgen against port %d: %d error(s), %d calls; "
                         "first: %s" % (port, rep["errors"], rep["calls"],
                                        rep["first_error"]))
    return rep


def us_per_call(rep, name):
    """CPU µs per call of a watched process; nan when it was not watched
    (the relay of the direct target) or could not be read."""
    cell = rep["cpu"].get(name)
    if not cell or cell["us_per_call"] is None:
        return float("nan")
    return cell["us_per_call"]


def perf_syscalls(lg, port, pid, conns, depth, seconds):
    """(syscalls per call, calls/s) of process pid while loadgen runs
    (perf counts for seconds-1 s inside the window)."""
    lg_proc = subprocess.Popen(
        [str(lg), "--uri-tcp", "127.0.0.1:%d" % port, "-c", str(conns),
         "-d", str(depth), "-t", str(seconds), "--warmup", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        span = seconds - 1.0
        t0 = time.perf_counter()
        pr = subprocess.run([PERF, "stat", "-x,", "-e",
                             "raw_syscalls:sys_enter", "-p", str(pid), "--",
                             "sleep", str(span)],
                            capture_output=True, text=True, timeout=span + 30)
        elapsed = time.perf_counter() - t0
        out, err = lg_proc.communicate(timeout=seconds + 60)
    finally:
        if lg_proc.poll() is None:
            lg_proc.kill()
            lg_proc.wait()
    rep = json.loads(out)
    if rep["errors"] or not rep["calls"]:
        raise BenchError("loadgen during perf: %s" % rep["first_error"])
    m = re.search(r"^(\d+),[^,]*,raw_syscalls:sys_enter", pr.stderr, re.M)
    if not m:
        raise BenchError("perf stat gave no count: %s" % pr.stderr[-300:])
    # perf's own start-up is inside `elapsed`; the count covers about span s
    calls = rep["calls_per_s"] * min(span, elapsed)
    return int(m.group(1)) / calls, rep["calls_per_s"]


def callgrind_totals(outdir, pid, before):
    """The "totals:" of the newest callgrind dump of pid not in `before`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = sorted(set(glob.glob("%s/cg.%d.*" % (outdir, pid))) - before,
                     key=os.path.getmtime)
        for path in new[::-1]:
            with open(path) as f:
                for line in f:
                    if line.startswith("totals:"):
                        return int(line.split()[1]), set(before) | set(new)
        time.sleep(0.2)
    raise BenchError("callgrind wrote no dump for pid %d" % pid)


def instructions_per_call(lg, port, pid, outdir, conns, depth, n1, n2):
    """(n2-n1)-call difference of callgrind totals per call; see the top."""
    ctl = [CALLGRIND_CONTROL]
    seen = set()
    totals = []
    loadgen(lg, port, conns, depth, 120, 0, calls=max(200, n1 // 5))
    for n in (n1, n2):
        subprocess.run(ctl + ["-z", str(pid)], capture_output=True,
                       timeout=60, check=True)
        rep = loadgen(lg, port, conns, depth, 300, 0, calls=n, timeout=400)
        subprocess.run(ctl + ["-d", str(pid)], capture_output=True,
                       timeout=60, check=True)
        tot, seen = callgrind_totals(outdir, pid, seen)
        totals.append((tot, rep["calls_total"]))
    (t1, c1), (t2, c2) = totals
    return (t2 - t1) / (c2 - c1)


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------

def cases_of(args):
    return [(c, d) for c in args.conns for d in args.depths]


def median_cells(results):
    """{(case, target): cell} with medians over the rounds."""
    for r in results:
        r["n"] = (r["conns"], r["depth"])
    return benchlib.summarize_rounds(
        results, median_keys=("calls_per_s", "p50_us", "p99_us",
                              "relay_us", "libvirtd_us", "loadgen_us"),
        sum_keys=("calls",), max_keys=("max_us",))


def main_table(summary, cases):
    head = ("| conns × depth | target | calls/s | vs direct | p50 µs | "
            "p99 µs | max µs | relay CPU µs/call | libvirtd CPU µs/call | "
            "loadgen CPU µs/call |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in cases:
        direct = summary.get((case, "direct"))
        for t in TARGETS:
            s = summary.get((case, t))
            if not s:
                continue
            lines.append("| %d × %d | %s | %.0f | %s× | %d | %d | %d | %s | "
                         "%s | %s |" % (
                             case[0], case[1], LABEL[t], s["calls_per_s"],
                             fmt(ratio(s["calls_per_s"],
                                       direct and direct["calls_per_s"])),
                             s["p50_us"], s["p99_us"], s["max_us"] or 0,
                             "-" if t == "direct" else fmt(s["relay_us"], 1),
                             fmt(s["libvirtd_us"], 1),
                             fmt(s["loadgen_us"], 1)))
    return "\n".join(lines)


def figures_table(summary, sysc, instr, big, small):
    """The issue's figures: one row per figure, one column per relay."""
    def cell(case, t, key):
        s = summary.get((case, t))
        return s[key] if s else None

    def vs_direct(case, t):
        return ratio(cell(case, t, "calls_per_s"),
                     cell(case, "direct", "calls_per_s"))

    def pair(a, b, nd):
        return "%s / %s" % (fmt(a, nd), fmt(b, nd))

    rows = [
        ("%d conns × depth %d: calls/s vs direct" % big,
         lambda t: fmt(vs_direct(big, t)) + "×"),
    ]
    rows += [
        ("%d conns × depth 1: calls/s vs direct" % big[0],
         lambda t: fmt(vs_direct((big[0], 1), t)) + "×"),
        ("1 conn × depth %d: calls/s vs direct" % small[1],
         lambda t: fmt(vs_direct(small, t)) + "×"),
        ("1-conn p50 latency vs direct (depth %d)" % small[1],
         lambda t: fmt(ratio(cell(small, t, "p50_us"),
                             cell(small, "direct", "p50_us"))) + "×"),
        ("relay CPU µs per forwarded call, %d×%d / %d×%d" % (big + small),
         lambda t: pair(cell(big, t, "relay_us"), cell(small, t, "relay_us"),
                        1)),
        ("syscalls per forwarded call, %d×%d / %d×%d" % (big + small),
         lambda t: pair(sysc.get((big, t)), sysc.get((small, t)), 1)),
        ("instructions per forwarded call (callgrind), %d×%d / %d×%d"
         % (big + small),
         lambda t: pair(instr.get((big, t)), instr.get((small, t)), 0)),
    ]
    head = "| figure | " + " | ".join(LABEL[t] for t in RELAYS) + " |"
    lines = [head, "|---|" + "---|" * len(RELAYS)]
    for title, fn in rows:
        lines.append("| %s | %s |" % (title, " | ".join(fn(t)
                                                         for t in RELAYS)))
    return "\n".join(lines)


def rounds_table(results):
    lines = ["| round | conns × depth | target | calls/s | p50 µs | p99 µs | "
             "relay CPU µs/call | libvirtd CPU µs/call |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append("| %d | %d × %d | %s | %.0f | %d | %d | %s | %s |" % (
            r["round"], r["conns"], r["depth"], r["target"], r["calls_per_s"],
            r["p50_us"], r["p99_us"], fmt(r["relay_us"], 1),
            fmt(r["libvirtd_us"], 1)))
    return "\n".join(lines)


def detail_table(values, cases, title, nd):
    lines = ["| conns × depth | " + " | ".join(LABEL[t] for t in RELAYS)
             + " |", "|---|" + "---|" * len(RELAYS)]
    for case in cases:
        if any((case, t) in values for t in RELAYS):
            lines.append("| %d × %d | %s |" % (case + (" | ".join(
                fmt(values.get((case, t)), nd) for t in RELAYS),)))
    return ["", title, ""] + lines


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", default="1,64")
    ap.add_argument("--depths", default="1,4")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-connections", type=int, default=4)
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--max-client-requests", type=int, default=64,
                    help="libvirtd.conf max_client_requests")
    ap.add_argument("--callgrind-calls", default="4000,16000",
                    help="N1,N2: calls of the two callgrind runs")
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--virtmux", help="gateway binary (default: build's)")
    ap.add_argument("--write", help="replace this script's section in FILE")
    args = ap.parse_args(argv)
    args.conns = benchlib.int_list(ap, args.conns, "--conns")
    args.depths = benchlib.int_list(ap, args.depths, "--depths")
    args.callgrind_calls = benchlib.int_list(ap, args.callgrind_calls,
                                             "--callgrind-calls")
    if len(args.callgrind_calls) != 2 or \
            args.callgrind_calls[0] >= args.callgrind_calls[1]:
        ap.error("--callgrind-calls takes N1,N2 with N1 < N2")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    source = benchlib.gateway_binary(args.virtmux)
    lg_source = harness.build_dir() / "bench" / "loadgen"
    more = [] if os.access(str(lg_source), os.X_OK) else [
        "%s missing: scripts/build.sh" % lg_source]
    benchlib.check_prerequisites(NAME, source, more)
    ensure_haproxy()
    with benchlib.binary_snapshot(source, "bench-forward-") as binary:
        lg = binary.parent / "loadgen"
        shutil.copy2(str(lg_source), str(lg))
        return run_benchmark(args, source, binary, lg)


def run_benchmark(args, source, binary, lg):
    facts = benchlib.machine_facts(binary, dirty_paths=("src", "proxy",
                                                        "bench/loadgen.c"))
    facts["binary"] = str(source)
    load_before = benchlib.loadavg()
    t_begin = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc)
    cases = cases_of(args)
    big = (max(args.conns), max(args.depths))
    small = (min(args.conns), min(args.depths))

    lvd = harness.Libvirtd(name="bench-fwd", extra_conf={
        "max_client_requests": args.max_client_requests})
    relays = {}
    results, sysc, instr, aborted = [], {}, {}, None
    try:
        lvd.start()
        relays["vm-tcp"] = harness.Virtmux(
            gateway_config(lvd.direct_uri, args), binary=binary,
            verbose=False).start()
        relays["vm-unix"] = harness.Virtmux(
            gateway_config(lvd.unix_uri, args), binary=binary,
            verbose=False).start()
        relays["haproxy"] = HAProxy(lvd.port).start()
        ports = {"direct": lvd.port}
        ports.update({t: relays[t].port for t in RELAYS})
        pids = {t: relays[t].proc.pid for t in RELAYS}
        print("# libvirtd %d, ports %s; load %s" % (lvd.proc.pid, ports,
                                                   load_before),
              file=sys.stderr)
        try:
            for rnd in range(args.rounds):
                for case in cases:
                    k = (rnd + cases.index(case)) % len(TARGETS)
                    for t in TARGETS[k:] + TARGETS[:k]:
                        watch = [("libvirtd", lvd.proc.pid)]
                        if t != "direct":
                            watch.append(("relay", pids[t]))
                        rep = loadgen(lg, ports[t], case[0], case[1],
                                      args.seconds, args.warmup, watch)
                        results.append({
                            "round": rnd, "conns": case[0], "depth": case[1],
                            "target": t, "calls": rep["calls"],
                            "calls_per_s": rep["calls_per_s"],
                            "p50_us": rep["p50_us"], "p99_us": rep["p99_us"],
                            "max_us": rep["max_us"],
                            "relay_us": us_per_call(rep, "relay"),
                            "libvirtd_us": us_per_call(rep, "libvirtd"),
                            "loadgen_us": us_per_call(rep, "loadgen")})
                        print("# round %d %d×%d %-8s %8.0f calls/s p50 %d µs"
                              % (rnd, case[0], case[1], t, rep["calls_per_s"],
                                 rep["p50_us"]), file=sys.stderr)
            if PERF and not args.no_perf:
                for case in cases:
                    for t in RELAYS:
                        sysc[(case, t)], _ = perf_syscalls(
                            lg, ports[t], pids[t], case[0], case[1],
                            max(3.0, args.seconds))
                        print("# perf %d×%d %s: %.2f syscalls/call"
                              % (case + (t, sysc[(case, t)])),
                              file=sys.stderr)
            if VALGRIND and CALLGRIND_CONTROL and not args.no_callgrind:
                instr = callgrind_pass(args, lvd, binary, lg, (big, small))
        except (BenchError, harness.HarnessError) as e:
            aborted = str(e)
            print("# aborted: %s" % e, file=sys.stderr)
    finally:
        for t in ("haproxy",):
            if t in relays:
                relays[t].stop()
        vmx_rc = {}
        for t in ("vm-tcp", "vm-unix"):
            if t in relays:
                vmx_rc[t] = relays[t].stop()
                relays[t].cleanup()
        lvd.cleanup()

    wall = time.monotonic() - t_begin
    summary = median_cells(results)
    body = report(args, facts, when, wall, load_before, summary, results,
                  sysc, instr, cases, big, small, vmx_rc, aborted)
    print(body)
    return benchlib.publish(args.write, NAME, body, aborted)


def callgrind_pass(args, lvd, binary, lg, cases):
    """{(case, relay): instructions per forwarded call}."""
    out = {}
    outdir = tempfile.mkdtemp(prefix="bench-forward-cg-")
    try:
        prefix = callgrind_wrapper(outdir)
        wrapper = os.path.join(outdir, "virtmux")
        write_wrapper(wrapper, prefix, binary)
        for t in RELAYS:
            if t == "haproxy":
                relay = HAProxy(lvd.port, wrapper=prefix).start()
            else:
                uri = lvd.direct_uri if t == "vm-tcp" else lvd.unix_uri
                relay = harness.Virtmux(gateway_config(uri, args),
                                        binary=wrapper, verbose=False,
                                        start_timeout=60).start()
            try:
                for case in cases:
                    n1, n2 = args.callgrind_calls
                    out[(case, t)] = instructions_per_call(
                        lg, relay.port, relay.proc.pid, outdir, case[0],
                        case[1], n1, n2)
                    print("# callgrind %d×%d %s: %.0f instructions/call"
                          % (case + (t, out[(case, t)])), file=sys.stderr)
            finally:
                relay.stop()
                if t != "haproxy":
                    relay.cleanup()
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    return out


def report(args, facts, when, wall, load_before, summary, results, sysc,
           instr, cases, big, small, vmx_rc, aborted):
    cmd = "/usr/bin/python3 bench/bench_forward.py --write docs/BENCHMARKS.md"
    body = ["## `bench/bench_forward.py`: the forwarding path, direct vs "
            "virtmux vs a blind relay", "",
            "DOMAIN_GET_INFO from `bench/loadgen` (C, epoll, every reply "
            "checked) straight to libvirtd, through virtmux with a TCP and "
            "with a UNIX upstream, and through HAProxy in TCP mode (one "
            "thread, no protocol awareness: the price of an extra hop). All "
            "four targets run at once in front of one libvirtd; only the "
            "one under load is busy. Generated by the script; rerun it "
            "rather than editing the text between the markers.", ""]
    body += benchlib.command_lines(cmd, when, wall)
    body += [
        "- Machine: %d CPUs, %s, kernel %s; load average before the run %s"
        % (facts["nproc"], facts["cpu"], facts["kernel"], load_before),
        "- `libvirtd --version`: %s; %s" % (
            facts["libvirtd"], harness_ver("haproxy")),
        "- virtmux: %s sha256 %s… built %s UTC; checkout HEAD %s%s" % (
            os.path.relpath(facts["binary"], str(REPO)), facts["binary_sha"],
            facts["binary_mtime"], facts["commit"],
            " (uncommitted changes)" if facts["dirty"] else ""),
        "- Setup: libvirtd test driver, TCP on 127.0.0.1, auth none, "
        "max_client_requests %d. virtmux: one TCP listener, pool "
        "max_connections %d, max_inflight %d, limits.max_client_requests 64, "
        "log.level warn. HAProxy: `mode tcp`, `nbthread 1` (the gateway has "
        "one event loop too), one server line to libvirtd's TCP port."
        % (args.max_client_requests, args.max_connections,
           args.max_inflight),
        "- Method: %d round(s) × %d case(s) × 4 targets, target order "
        "rotating; %.0f s warm-up, %.0f s measured; cells are medians over "
        "the rounds. CPU µs per call: utime+stime from /proc/PID/stat over "
        "loadgen's window divided by the calls in it (10 ms tick "
        "resolution). Syscalls: `perf stat -e raw_syscalls:sys_enter -p "
        "PID` for %.0f s inside one extra run per case and relay. "
        "Instructions: the relay under `valgrind --tool=callgrind`, "
        "`callgrind_control -z` / `-d` around runs of %d and %d calls, "
        "(difference of totals) / (difference of calls)."
        % (args.rounds, len(cases), args.warmup, args.seconds,
           max(3.0, args.seconds) - 1, args.callgrind_calls[0],
           args.callgrind_calls[1]),
        ""]
    body += ["Figures (columns: the relay; ratios are relay / direct in the "
             "same rounds):", "", figures_table(summary, sysc, instr, big,
                                                small), "",
             "Medians per case:", "", main_table(summary, cases)]
    if sysc:
        body += detail_table(sysc, cases, "Syscalls per forwarded call "
                             "(perf, all threads of the relay):", 2)
    if instr:
        body += detail_table(instr, [big, small], "Instructions per "
                             "forwarded call (callgrind, whole relay "
                             "process):", 0)
    body += interpretation(summary, sysc, instr, cases, big, small, vmx_rc,
                           aborted)
    body += benchlib.details_lines("Every round", rounds_table(results))
    return "\n".join(body)


def harness_ver(name):
    try:
        out = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()
        return out[0].split(" - ")[0] if out else name
    except OSError:
        return name


def interpretation(summary, sysc, instr, cases, big, small, vmx_rc, aborted):
    lines = benchlib.interpretation_head(aborted)

    def cps(case, t):
        s = summary.get((case, t))
        return s["calls_per_s"] if s else float("nan")

    for case in cases:
        parts = ["%s %s×" % (LABEL[t], fmt(ratio(cps(case, t),
                                                 cps(case, "direct"))))
                 for t in RELAYS]
        lines.append("- %d × %d: direct %.0f calls/s; %s." % (
            case[0], case[1], cps(case, "direct"), ", ".join(parts)))
    s_vm = summary.get((big, "vm-tcp"))
    s_ha = summary.get((big, "haproxy"))
    if s_vm and s_ha and s_vm["relay_us"] and s_ha["relay_us"]:
        lines.append("- At %d × %d virtmux (TCP upstream) spent %s µs of CPU "
                     "per forwarded call against HAProxy's %s µs (%s×); "
                     "HAProxy only copies bytes, virtmux also frames, "
                     "rewrites serials and multiplexes onto its pool." % (big + (fmt(s_vm["relay_us"], 1),
                                             fmt(s_ha["relay_us"], 1),
                                             fmt(ratio(s_vm["relay_us"],
                                                       s_ha["relay_us"])))))
    if (big, "vm-tcp") in sysc and (big, "haproxy") in sysc:
        lines.append("- Syscalls per forwarded call at %d × %d: virtmux %s "
                     "(TCP upstream), %s (UNIX upstream), HAProxy %s; at "
                     "%d × %d: %s, %s, %s." % (
                         big + (fmt(sysc.get((big, "vm-tcp"))),
                                fmt(sysc.get((big, "vm-unix"))),
                                fmt(sysc.get((big, "haproxy"))))
                         + small + (fmt(sysc.get((small, "vm-tcp"))),
                                    fmt(sysc.get((small, "vm-unix"))),
                                    fmt(sysc.get((small, "haproxy"))))))
    lines.append("- Everything shares the machine's CPUs: loadgen, libvirtd "
                 "and the relay under load compete, so absolute rates move "
                 "from run to run; compare the ratios of one run.")
    lines.append("- virtmux exit status on SIGTERM: %s." % ", ".join(
        "%s %s" % (t, rc) for t, rc in sorted(vmx_rc.items())))
    return lines


if __name__ == "__main__":
    benchlib.run_main(main, NAME)
