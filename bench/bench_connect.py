#!/usr/bin/python3
"""Connection set-up with TLS + SASL (SCRAM-SHA-256 over TLS): clients
straight to libvirtd versus the same clients through virtmux, whose
upstream connection is already open.

One private libvirtd (test driver) listens for TLS with auth_tls = "sasl"
(SCRAM-SHA-256 from its own sasldb, client certificates checked). One virtmux
in front of it has a TLS listener with auth "sasl" (SCRAM-SHA-256 from the
gateway's sasldb) and reaches the same libvirtd over TLS + SASL as itself
(certificate CN=virtmux-gw, SASL user virtmux). A keeper connection through
the gateway is opened before anything is measured and held to the end, so
the gateway's upstream link is up the whole time.

For each round and target, a client process (multiprocessing, spawn) runs
--threads threads that loop: libvirt.openAuth(URI with pkipath, SCRAM
credentials), lookupByName("test"), close(). After a warm-up, a window of
--seconds is measured:

  * connects/s       open+lookup+close cycles completed inside the window
  * p50/p99 ms       latency of those cycles
  * CPU              utime+stime of libvirtd, virtmux and the client process
                     from /proc/PID/stat over the window, per 1000 connects
  * upstream handshakes per client connect
                     connections libvirtd accepted during the run divided by
                     the cycles the clients ran: libvirtd numbers its clients
                     from one counter, so the id of a probe connection made
                     after the run minus the id of one made before it, minus
                     one, is how many connections it accepted in between
                     (virt-admin srv-clients-list). Direct this is 1 per
                     cycle; through virtmux it should be 0.

Run as root with /usr/bin/python3 from the repository root:

    /usr/bin/python3 bench/bench_connect.py --write docs/BENCHMARKS.md

--write replaces only the section between the bench_connect markers (or
appends it). Every wait is bounded; every process started is stopped in a
finally block. A default run takes about 60 s.
"""

import argparse
import datetime
import multiprocessing
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time

import benchlib
from benchlib import TARGETS, BenchError, harness

import pki  # from tests/e2e, which benchlib puts on sys.path

NAME = "bench_connect"
USER, PASSWORD = "alice", "bench-secret"
GW_USER, GW_PASSWORD = "virtmux", "gw-secret"
TARGET_RATIO = 3.0


# --------------------------------------------------------------------------
# the client process
# --------------------------------------------------------------------------

def client_main(uri, threads, start_at, end_at, out):
    """One process, `threads` threads of open/lookup/close until end_at
    (time.monotonic, comparable between processes on Linux)."""
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    creds = pki.auth_callback(USER, PASSWORD)
    lock = threading.Lock()
    res = {"cycles": 0, "in_window": 0, "lat": [], "errors": [],
           "nerrors": 0}

    def worker():
        while time.monotonic() < end_at:
            t0 = time.monotonic()
            try:
                c = libvirt.openAuth(uri, creds, 0)
                try:
                    c.lookupByName("test")
                finally:
                    c.close()
                ok = True
            except libvirt.libvirtError as e:
                ok = False
                with lock:
                    res["nerrors"] += 1
                    if len(res["errors"]) < 5:
                        res["errors"].append(str(e))
            t1 = time.monotonic()
            with lock:
                res["cycles"] += 1
                if ok and start_at <= t1 <= end_at:
                    res["in_window"] += 1
                    res["lat"].append(t1 - t0)

    ts = [threading.Thread(target=worker, daemon=True)
          for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(end_at - time.monotonic() + 60)
    res["stuck"] = sum(1 for t in ts if t.is_alive())
    out.put(res)


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------

def cpu_seconds(pid):
    """utime+stime of a process in seconds, nan once it is gone."""
    return benchlib.proc_cpu(pid, missing=float("nan"))


def machine_busy():
    """Machine CPU seconds in every /proc/stat column but idle and iowait:
    unlike benchlib.machine_busy() this counts steal, guest and guest_nice
    too, so it stays here: sharing it would change reported numbers."""
    v = benchlib.cpu_ticks()
    return (sum(v) - v[3] - v[4]) / benchlib.CLK_TCK


def last_client_id(lvd, uri):
    """Open a probe connection straight to libvirtd (TCP, auth none) and
    return its client id (the highest id listed while it is open)."""
    import libvirt
    c = harness.call_with_timeout(libvirt.open, uri, timeout=30)
    try:
        ids = lvd.client_ids()
    finally:
        c.close()
    if not ids:
        raise BenchError("virt-admin listed no clients with a probe open")
    return max(ids)


def percentile(vals, q):
    """Percentile of unsorted vals: the element at rank round(q% * n + 0.5)
    with Python's round (halves to even). Where q% * n is an odd whole
    number this is one rank above the nearest rank benchlib.percentile()
    takes, so it stays here: sharing it would change reported numbers."""
    if not vals:
        return float("nan")
    vals = sorted(vals)
    return vals[max(0, min(len(vals) - 1, int(round(q / 100.0 * len(vals)
                                                    + 0.5)) - 1))]


def measure(target, uri, lvd, gw, probe_uri, args):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    id_before = last_client_id(lvd, probe_uri)
    start_at = time.monotonic() + args.warmup + 1.0   # + process start-up
    end_at = start_at + args.seconds
    p = ctx.Process(target=client_main,
                    args=(uri, args.threads, start_at, end_at, q))
    p.start()
    pids = {"libvirtd": lvd.proc.pid, "virtmux": gw.proc.pid,
            "clients": p.pid}
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
    busy0 = machine_busy()
    nclients = []
    while time.monotonic() < end_at:
        try:
            nclients.append(lvd.nclients())
        except harness.HarnessError:
            pass
        time.sleep(min(0.5, max(0.0, end_at - time.monotonic())))
    cpu1 = {k: cpu_seconds(v) for k, v in pids.items()}
    busy1 = machine_busy()
    try:
        res = q.get(timeout=90)
    except Exception:
        p.kill()
        raise BenchError("%s: the client process did not report" % target)
    p.join(30)
    if res["stuck"]:
        raise BenchError("%s: %d client threads stuck" % (target,
                                                          res["stuck"]))
    id_after = last_client_id(lvd, probe_uri)
    accepted = id_after - id_before - 1
    n = res["in_window"]
    cpu = {k: cpu1[k] - cpu0[k] for k in pids}
    return {
        "target": target, "connects": n, "rate": n / args.seconds,
        "p50": percentile(res["lat"], 50) * 1000,
        "p99": percentile(res["lat"], 99) * 1000,
        "cpu": cpu, "machine": busy1 - busy0,
        "per1k": {k: (v / n * 1000 * 1000 if n else float("nan"))
                  for k, v in cpu.items()},
        "cycles": res["cycles"], "accepted": accepted,
        "handshakes_per_connect": (accepted / res["cycles"]
                                   if res["cycles"] else float("nan")),
        "nclients_max": max(nclients) if nclients else None,
        "nclients_min": min(nclients) if nclients else None,
        "errors": res["nerrors"], "error_samples": res["errors"],
    }


# --------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------

def setup(workdir, binary):
    ca = pki.Pki(os.path.join(workdir, "ca"))
    server = ca.server("localhost")
    client = ca.client("client1")
    gwcert = ca.client("virtmux-gw")
    pkidir = ca.client_dir(client)
    lvd_env = pki.libvirtd_sasl_env(os.path.join(workdir, "lvd-sasl"),
                                    {USER: PASSWORD, GW_USER: GW_PASSWORD},
                                    mechs="scram-sha-256")
    tls_port = harness.free_port()
    conf = ca.libvirtd_tls_conf(server)
    conf.update({"tls_port": str(tls_port), "auth_tls": "sasl",
                 "max_anonymous_clients": 200, "max_clients": 5000})
    lvd = harness.Libvirtd(name="bench-connect", extra_conf=conf,
                           env=lvd_env)
    gw_db = pki.make_sasldb(os.path.join(workdir, "gw.sasldb"),
                            {USER: PASSWORD})
    pw = pki.write_password_file(os.path.join(workdir, "gw.pw"), GW_PASSWORD)
    gw_port = harness.free_port()
    up = harness.upstream_entry("hv1", "test+tls://127.0.0.1:%d/default"
                                % tls_port)
    up["tls"] = {"ca": ca.ca_cert, "cert": gwcert.cert, "key": gwcert.key}
    up["sasl"] = {"username": GW_USER, "password_file": pw}
    cfg = harness.make_config(
        [up], default_upstream="hv1",
        listeners=[{"name": "tls", "address": "127.0.0.1:%d" % gw_port,
                    "auth": "sasl",
                    "tls": {"cert": server.cert, "key": server.key,
                            "ca": ca.ca_cert, "verify_client": "required"}}],
        sasl={"sasldb": gw_db, "mechanisms": ["scram-sha-256"],
              "max_failures": 100000},
        log={"level": "warn"}, admin=True)
    gw = harness.Virtmux(cfg, binary=binary, verbose=False)
    uris = {
        "direct": "test+tls://127.0.0.1:%d/default?pkipath=%s"
                  % (tls_port, pkidir),
        "virtmux": "test+tls://127.0.0.1:%d/default?pkipath=%s"
                   % (gw_port, pkidir),
    }
    return lvd, gw, uris, {"tls_port": tls_port, "gw_port": gw_port}


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def median_row(rows, target):
    rs = [r for r in rows if r["target"] == target]
    med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
    out = {"target": target, "rate": med("rate"), "p50": med("p50"),
           "p99": med("p99"), "connects": sum(r["connects"] for r in rs),
           "cycles": sum(r["cycles"] for r in rs),
           "accepted": sum(r["accepted"] for r in rs),
           "errors": sum(r["errors"] for r in rs),
           "nclients_max": max(r["nclients_max"] or 0 for r in rs),
           "nclients_min": min(r["nclients_min"] or 0 for r in rs)}
    out["handshakes_per_connect"] = (out["accepted"] / out["cycles"]
                                     if out["cycles"] else float("nan"))
    for k in ("libvirtd", "virtmux", "clients"):
        out["per1k_" + k] = statistics.median(r["per1k"][k] for r in rs)
        out["cpu_" + k] = statistics.median(r["cpu"][k] for r in rs)
    out["per1k_machine"] = statistics.median(
        r["machine"] / r["connects"] * 1e6 if r["connects"] else float("nan")
        for r in rs)
    return out


def report(args, f, rows, command, wall, exit_status, gw_log_warn):
    d, v = median_row(rows, "direct"), median_row(rows, "virtmux")
    ratio = v["rate"] / d["rate"] if d["rate"] else float("nan")
    met_rate = ratio >= TARGET_RATIO
    met_hs = v["accepted"] == 0
    L = []
    L.append("## Connection set-up with TLS + SASL: direct vs through "
             "virtmux")
    L.append("")
    L.extend(benchlib.command_lines(
        command, datetime.datetime.now(datetime.timezone.utc), wall))
    L.append("- Machine: %s CPUs, %s, kernel %s; load average before the "
             "run %s" % (f["cpu_count"], f["cpu"], f["kernel"], f["load"]))
    L.append("- `%s`; Python %s" % (f["libvirtd"], f["python"]))
    L.append("- virtmux: copy of %s, sha256 %s…, built %s UTC; checkout "
             "HEAD %s%s" % (args.virtmux or "build/proxy/virtmux",
                            f["binary_sha"], f["binary_mtime"], f["commit"],
                            " (src/ or proxy/ modified in the working tree)"
                            if f["dirty"] else ""))
    L.append("- Set-up: libvirtd (test driver) listening for TLS with "
             "`auth_tls = \"sasl\"`, mech_list scram-sha-256, client "
             "certificates verified. virtmux: TLS listener, `auth: \"sasl\"` "
             "(scram-sha-256, its own sasldb), upstream "
             "`test+tls://127.0.0.1:PORT/default` to the same libvirtd with "
             "its own certificate (CN=virtmux-gw) and SASL user `virtmux`, "
             "pool defaults, log.level warn; a keeper connection through "
             "virtmux holds the upstream link open during the whole run. "
             "Certificates: RSA 2048.")
    L.append("- Method: per round and target one client process (spawn) "
             "with %d threads looping `openAuth(URI?pkipath=..., "
             "[AUTHNAME, PASSPHRASE])` + `lookupByName('test')` + "
             "`close()`; %.0f s warm-up, %.0f s measured; %d rounds, target "
             "order alternating; cells are medians over the rounds. CPU is "
             "utime+stime from /proc/PID/stat over the window. Upstream "
             "handshakes = connections libvirtd accepted during the run "
             "(difference of the client ids of two probe connections, "
             "virt-admin) / open cycles the clients ran."
             % (args.threads, args.warmup, args.seconds, args.rounds))
    L.append("")
    L.append("| target | connects/s | p50 ms | p99 ms | libvirtd CPU ms / 1k "
             "connects | virtmux CPU ms / 1k | clients CPU ms / 1k | "
             "machine CPU ms / 1k | upstream handshakes / client connect | "
             "libvirtd clients during the window (min–max) | errors |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in (d, v):
        L.append("| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | "
                 "%.3f (%d / %d) | %d–%d | %d |"
                 % (r["target"], r["rate"], r["p50"], r["p99"],
                    r["per1k_libvirtd"],
                    r["per1k_virtmux"] if r["target"] == "virtmux" else 0.0,
                    r["per1k_clients"], r["per1k_machine"],
                    r["handshakes_per_connect"], r["accepted"], r["cycles"],
                    r["nclients_min"], r["nclients_max"], r["errors"]))
    L.extend(benchlib.interpretation_head(None))
    L.append("- Connect rate through virtmux: **%.2f×** direct (%.1f vs "
             "%.1f connects/s). Target ≥ %.0f×: **%s**."
             % (ratio, v["rate"], d["rate"], TARGET_RATIO,
                "met" if met_rate else "not met"))
    L.append("- Upstream handshakes per client connect through virtmux: "
             "**%.3f** (%d connections accepted by libvirtd for %d client "
             "open cycles; direct: %.3f). Target 0: **%s**."
             % (v["handshakes_per_connect"], v["accepted"], v["cycles"],
                d["handshakes_per_connect"], "met" if met_hs else "not met"))
    if d["per1k_libvirtd"] > 0:
        L.append("- libvirtd CPU per 1000 client connects: %.1f ms through "
                 "virtmux vs %.1f ms direct (%.1f%%); the TLS handshake and "
                 "SCRAM exchange moved to virtmux, which spent %.1f ms per "
                 "1000 connects."
                 % (v["per1k_libvirtd"], d["per1k_libvirtd"],
                    100.0 * v["per1k_libvirtd"] / d["per1k_libvirtd"],
                    v["per1k_virtmux"]))
    if v["per1k_machine"] > 0:
        L.append("- Whole-machine CPU per connect: %.1f ms through virtmux vs "
                 "%.1f ms direct; the machine was busy %.0f%% / %.0f%% of its "
                 "%s CPUs. If CPU were the only limit the rate ratio would be "
                 "%.2f×: the clients' own TLS + SCRAM work (%.1f ms per "
                 "connect through virtmux, %.1f ms direct) is paid either "
                 "way, and the gateway now pays the server side that libvirtd "
                 "paid, on the same CPUs."
                 % (v["per1k_machine"] / 1000, d["per1k_machine"] / 1000,
                    100 * v["per1k_machine"] / 1e6 * v["rate"]
                    / f["cpu_count"],
                    100 * d["per1k_machine"] / 1e6 * d["rate"]
                    / f["cpu_count"],
                    f["cpu_count"], d["per1k_machine"] / v["per1k_machine"],
                    v["per1k_clients"] / 1000, d["per1k_clients"] / 1000))
    if v["per1k_virtmux"] > 0:
        L.append("- virtmux runs every client's TLS handshake and SCRAM "
                 "exchange on its one event-loop thread: at %.1f ms of CPU "
                 "per connect that thread saturates near %.0f connects/s, "
                 "however fast the clients are (libvirtd spreads its %.1f ms "
                 "per connect over its worker threads)."
                 % (v["per1k_virtmux"] / 1000, 1e6 / v["per1k_virtmux"],
                    d["per1k_libvirtd"] / 1000))
    busiest = max(("libvirtd", "virtmux", "clients"),
                  key=lambda k: v["cpu_" + k])
    L.append("- Through virtmux the busiest process in the window was %s "
             "(%.0f%% of one core; virtmux %.0f%%, clients %.0f%%, libvirtd "
             "%.0f%%); direct: libvirtd %.0f%%, clients %.0f%% of one core, "
             "on %s CPUs shared by everything."
             % (busiest, 100 * v["cpu_" + busiest] / args.seconds,
                100 * v["cpu_virtmux"] / args.seconds,
                100 * v["cpu_clients"] / args.seconds,
                100 * v["cpu_libvirtd"] / args.seconds,
                100 * d["cpu_libvirtd"] / args.seconds,
                100 * d["cpu_clients"] / args.seconds, f["cpu_count"]))
    L.append("- Errors during the run: %d direct, %d through virtmux.%s"
             % (d["errors"], v["errors"],
                "" if not (d["errors"] or v["errors"]) else " Samples: "
                + "; ".join(sorted({e for r in rows
                                    for e in r["error_samples"]})[:3])))
    L.append("- virtmux at the end: %s; warn/error lines it logged: %d."
             % (exit_status, len(gw_log_warn)))
    for line in gw_log_warn[:5]:
        L.append("  - `%s`" % line[:200])
    R = ["| round | target | connects/s | p50 ms | p99 ms | libvirtd "
         "CPU s | virtmux CPU s | clients CPU s | cycles | libvirtd "
         "accepted | errors |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        R.append("| %d | %s | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %d | "
                 "%d | %d |" % (r["round"], r["target"], r["rate"], r["p50"],
                                r["p99"], r["cpu"]["libvirtd"],
                                r["cpu"]["virtmux"], r["cpu"]["clients"],
                                r["cycles"], r["accepted"], r["errors"]))
    L.extend(benchlib.details_lines("Every round", "\n".join(R)))
    return "\n".join(L) + "\n", met_rate and met_hs


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--virtmux", help="gateway binary (default: the build)")
    ap.add_argument("--write", help="update this markdown file's section")
    args = ap.parse_args()
    command = shlex.join(["/usr/bin/python3"] + sys.argv)

    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    t_start = time.monotonic()
    work = tempfile.mkdtemp(prefix="virtmux-bench-connect-")
    source = benchlib.gateway_binary(args.virtmux)
    binary = os.path.join(work, "virtmux")
    shutil.copy2(str(source), binary)
    f = benchlib.machine_facts(binary)
    f["load"] = benchlib.loadavg()
    lvd = gw = keeper = None
    rows = []
    exit_status = "not started"
    try:
        lvd, gw, uris, _ports = setup(work, binary)
        lvd.start()
        gw.start()
        keeper = harness.call_with_timeout(
            libvirt.openAuth, uris["virtmux"],
            pki.auth_callback(USER, PASSWORD), 0, timeout=30)
        keeper.lookupByName("test")
        info = lvd.clients()
        if len(info) != 1 or info[0].get("sasl_user_name") != GW_USER:
            raise BenchError("libvirtd does not see exactly the gateway: %r"
                             % info)
        probe = lvd.direct_uri          # TCP, auth none: for client ids only
        for rnd in range(args.rounds):
            order = TARGETS if rnd % 2 == 0 else TARGETS[::-1]
            for target in order:
                r = measure(target, uris[target], lvd, gw, probe, args)
                r["round"] = rnd
                rows.append(r)
                print("round %d %-8s %7.1f connects/s  p50 %.1f ms  "
                      "libvirtd accepted %d for %d cycles  errors %d"
                      % (rnd, target, r["rate"], r["p50"], r["accepted"],
                         r["cycles"], r["errors"]), flush=True)
                if not gw.running():
                    raise BenchError("virtmux died: %s" % gw.log_tail(20))
        keeper.lookupByName("test")
    finally:
        if keeper is not None:
            try:
                keeper.close()
            except libvirt.libvirtError:
                pass
        if gw is not None and gw.proc is not None:
            running = gw.running()
            code = gw.stop()
            exit_status = ("running, exit status %s on SIGTERM" % code
                           if running else "**exited during the run (%s)**"
                           % code)
        warn = [l.split(" ", 1)[1] if " " in l else l
                for l in (gw.log_text().splitlines() if gw else [])
                if " warn " in l or " error " in l]
        if lvd is not None:
            lvd.stop()
    wall = time.monotonic() - t_start
    body, met = report(args, f, rows, command, wall, exit_status, warn)
    print(body)
    if args.write:
        benchlib.write_section(args.write, NAME, body)
        print("wrote the bench_connect section of %s" % args.write)
    if lvd is not None:
        lvd.cleanup()
    if gw is not None:
        gw.cleanup()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
