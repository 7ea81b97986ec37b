"""Soak: mixed load with churn for VIRTMUX_SOAK_SECONDS (default 60), the
gateway's memory and descriptors sampled every second.

Load, all through one gateway at once:
  * CHURNERS threads that open a connection, make a few calls and close it;
  * LONG_LIVED threads, each with one connection for the whole run, calling
    DOMAIN_GET_INFO / LIST_ALL_DOMAINS every 10 ms;
  * EVENT_THREADS threads in a child process with libvirt's event loop
    (harness.EventClients "churn"): open, register a lifecycle callback,
    deregister, close, again;
  * one screenshot stream every SCREENSHOT_EVERY seconds.

After a warm-up (the first 25 %), a least-squares line through the RSS
samples must be flat: its rise over the measured window stays below
2 MiB + 5 % of the RSS at the end of the warm-up. Once the load stops and
the clients have gone, the /status totals are at rest and the descriptor
count is back to its value before the load (+-2). No error is allowed.
"""

import gc
import os
import threading
import time

import libvirt
import pytest

import faultkit
import harness
from faultkit import wait_rest
from harness import start_call

SOAK_S = float(os.environ.get("VIRTMUX_SOAK_SECONDS", "60"))
CHURNERS = 3
LONG_LIVED = 4
EVENT_THREADS = 2
SCREENSHOT_EVERY = 2.0
WARMUP = 0.25
RSS_ALLOWANCE_KIB = 2048
RSS_ALLOWANCE_FRAC = 0.05
FD_SLACK = 2
IDLE_TIMEOUT_S = 2


def slope(points):
    """Least-squares slope of [(x, y)]."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx


class Load:
    """Counts of successful calls and the errors, shared by the threads."""

    def __init__(self, uri, stop):
        self.uri, self.stop = uri, stop
        self.lock = threading.Lock()
        self.calls = 0
        self.errors = []
        self.counts = {"sessions": 0, "screenshots": 0}

    def ok(self, n=1, kind=None):
        with self.lock:
            self.calls += n
            if kind:
                self.counts[kind] += 1

    def failed(self, what, e):
        with self.lock:
            self.errors.append("%s: %s" % (what, e))

    def churner(self):
        while not self.stop.is_set():
            try:
                conn = libvirt.open(self.uri)
                try:
                    dom = conn.lookupByName("test")
                    dom.info()
                    conn.listAllDomains(0)
                    del dom         # it holds the connection open
                    self.ok(4, "sessions")
                finally:
                    conn.close()
            except libvirt.libvirtError as e:
                self.failed("churn", e)

    def long_lived(self):
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            self.failed("open", e)
            return
        try:
            dom = conn.lookupByName("test")
            k = 0
            while not self.stop.is_set():
                try:
                    if k % 5 == 0:
                        conn.listAllDomains(0)
                    else:
                        dom.info()
                    self.ok()
                except libvirt.libvirtError as e:
                    self.failed("call", e)
                k += 1
                time.sleep(0.01)
            del dom
        finally:
            conn.close()

    def screenshots(self):
        conn = libvirt.open(self.uri)
        try:
            while not self.stop.wait(SCREENSHOT_EVERY):
                try:
                    dom = conn.lookupByName("test")
                    st = conn.newStream(0)
                    mime = dom.screenshot(st, 0, 0)
                    size = 0
                    while True:
                        chunk = st.recv(1 << 16)
                        if not chunk:
                            break
                        size += len(chunk)
                    st.finish()
                    del st, dom
                    if mime != "image/png" or size == 0:
                        self.failed("screenshot", (mime, size))
                    else:
                        self.ok(1, "screenshots")
                except libvirt.libvirtError as e:
                    self.failed("screenshot", e)
        finally:
            conn.close()


@pytest.mark.timeout(int(SOAK_S) + 180)
def test_soak(libvirtd, gateway, event_clients):
    gw = gateway(harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri,
                                max_connections=4, max_inflight=4,
                                idle_timeout_s=IDLE_TIMEOUT_S)],
        default_upstream="hv1", admin=True))
    pid = gw.proc.pid
    bad, totals = wait_rest(gw, sessions=0, max_links=0)
    assert not bad, (bad, totals)
    fds_before = faultkit.proc_nfds(pid)
    rss_before = faultkit.proc_rss_kib(pid)

    stop = threading.Event()
    load = Load(gw.uri(), stop)
    events = event_clients()
    threads = [start_call(load.churner) for _ in range(CHURNERS)]
    threads += [start_call(load.long_lived) for _ in range(LONG_LIVED)]
    threads.append(start_call(load.screenshots))
    ev_thread, ev_res = start_call(events.request, op="churn",
                                   uri=gw.uri(), seconds=SOAK_S,
                                   threads=EVENT_THREADS,
                                   timeout=SOAK_S + 60)
    samples = []            # (t, rss KiB, fds)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < SOAK_S:
            samples.append((time.monotonic() - t0,
                            faultkit.proc_rss_kib(pid),
                            faultkit.proc_nfds(pid)))
            time.sleep(1.0)
            assert gw.running(), "the gateway died"
    finally:
        stop.set()
        for t, _ in threads:
            t.join(30)
        ev_thread.join(SOAK_S + 70)
    assert not any(t.is_alive() for t, _ in threads), "load threads hang"
    assert not ev_thread.is_alive(), "event churn hangs"
    thread_errors = [repr(r.error) for _, r in threads if r.error]
    assert ev_res.error is None, ev_res.error
    ev = ev_res.value
    events.close()
    gc.collect()

    # at rest once everyone left; the idle links retire after 2 s
    bad, totals = wait_rest(gw, sessions=0, max_links=0,
                            timeout=IDLE_TIMEOUT_S + 15)
    fds_after = faultkit.proc_nfds(pid)
    rss_after = faultkit.proc_rss_kib(pid)

    measured = [s for s in samples if s[0] >= SOAK_S * WARMUP]
    rss_slope = slope([(s[0], s[1]) for s in measured])     # KiB/s
    window = measured[-1][0] - measured[0][0]
    rise = rss_slope * window
    allowed = RSS_ALLOWANCE_KIB + RSS_ALLOWANCE_FRAC * measured[0][1]
    fd_slope = slope([(s[0], s[2]) for s in measured])
    print("soak %.0f s: %d calls, %d churned sessions, %d screenshots, "
          "%d event cycles, %d errors" % (
              SOAK_S, load.calls, load.counts["sessions"],
              load.counts["screenshots"], ev["cycles"],
              len(load.errors) + len(ev["errors"]) + len(thread_errors)))
    print("RSS %d KiB before, %d at warm-up end, %d at the end of the load, "
          "%d after; slope %.2f KiB/s (%+.0f KiB over %.0f s, allowed %.0f)"
          % (rss_before, measured[0][1], samples[-1][1], rss_after, rss_slope,
             rise, window, allowed))
    print("fds %d before, %d-%d under load (slope %.3f/s), %d after"
          % (fds_before, min(s[2] for s in samples),
             max(s[2] for s in samples), fd_slope, fds_after))

    assert not load.errors, load.errors[:5]
    assert not thread_errors, thread_errors
    assert not ev["errors"] and ev["stuck"] == 0, ev
    assert load.counts["sessions"] > 0 and load.counts["screenshots"] > 0
    assert ev["cycles"] > 0
    assert len(measured) >= 5, len(measured)
    if not harness.is_sanitized(gw.binary):    # ASan's quarantine grows
        assert rise < allowed, (rss_slope, rise, allowed)
    assert not bad, (bad, totals)
    assert abs(fds_after - fds_before) <= FD_SLACK, (fds_before, fds_after)
