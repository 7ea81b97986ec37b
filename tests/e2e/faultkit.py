"""Helpers shared by the fault, flood and soak tests.

* ``wait_rest`` polls the gateway's ``GET /status`` totals until they are back
  at their resting values (bounded) and returns what it saw last.
* ``Probe`` is a well-behaved libvirt-python client in a child process (so
  that threads and floods in the test process cannot skew its timings): it
  calls ``dom.info()`` at a steady pace and records the latency of each call.
* ``FaultRelay`` sits between the gateway and libvirtd like ``tap.Tap``, but
  cuts libvirtd's replies into frames so that it can hold chosen frames back
  (a call stays in flight as long as the test wants) or cut the connection
  in the middle of one.
* ``proc_rss_kib`` / ``proc_nfds`` read a process' memory and descriptors.

Like harness.py, nothing here needs pytest; every wait is bounded.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import harness

# Totals that are zero whenever no call, stream or opening is in progress.
IDLE_ZERO = ("unauthenticated", "calls_outstanding", "inflight",
             "internal_inflight", "queued", "opening", "streams")


def rest_problems(totals, sessions, max_links):
    """What differs from the resting state, as a list of strings: `sessions`
    open sessions (each holding one link reference), nothing in progress,
    at most `max_links` upstream links."""
    bad = ["%s=%d" % (k, totals[k]) for k in IDLE_ZERO if totals[k] != 0]
    if totals["sessions"] != sessions:
        bad.append("sessions=%d (want %d)" % (totals["sessions"], sessions))
    if totals["link_refs"] != sessions:
        bad.append("link_refs=%d (want %d)" % (totals["link_refs"], sessions))
    if totals["links"] > max_links:
        bad.append("links=%d (want <= %d)" % (totals["links"], max_links))
    return bad


def wait_rest(gw, sessions=0, max_links=1, timeout=10.0):
    """Wait until /status totals are at rest; returns (problems, totals):
    problems is [] on success."""
    deadline = time.monotonic() + timeout
    while True:
        totals = gw.status()["totals"]
        bad = rest_problems(totals, sessions, max_links)
        if not bad or time.monotonic() >= deadline:
            return bad, totals
        time.sleep(0.05)


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise harness.HarnessError("no VmRSS for pid %d" % pid)


def proc_nfds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


# --------------------------------------------------------------------------
# a well-behaved client in a child process
# --------------------------------------------------------------------------

PROBE_SCRIPT = r'''
import json, sys, threading, time
import libvirt

libvirt.registerErrorHandler(lambda *a: None, None)
uri, user, password, interval = sys.argv[1], sys.argv[2], sys.argv[3], \
    float(sys.argv[4])


def auth_cb(creds, _opaque):
    for c in creds:
        if c[0] == libvirt.VIR_CRED_AUTHNAME:
            c[4] = user
        elif c[0] == libvirt.VIR_CRED_PASSPHRASE:
            c[4] = password
    return 0


if user:
    conn = libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME,
                                   libvirt.VIR_CRED_PASSPHRASE], auth_cb,
                                  None], 0)
else:
    conn = libvirt.open(uri)
dom = conn.lookupByName("test")
expected = dom.info()[:4]
lock = threading.Lock()
samples = []            # [start, latency, error or null]
run = threading.Event()
idle = threading.Event()
run.set()


def loop():
    while True:
        if not run.is_set():
            idle.set()
            run.wait()
            idle.clear()
        t0 = time.monotonic()
        err = None
        try:
            if dom.info()[:4] != expected:
                err = "wrong answer"
        except libvirt.libvirtError as e:
            err = "%d: %s" % (e.get_error_code(), e)
        lat = time.monotonic() - t0
        with lock:
            samples.append([t0, lat, err])
        rest = interval - lat
        if rest > 0:
            time.sleep(rest)


threading.Thread(target=loop, daemon=True).start()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)["op"]
    if cmd == "take":
        with lock:
            out = list(samples)
            del samples[:]
        print(json.dumps({"samples": out}), flush=True)
    elif cmd == "pause":
        run.clear()
        ok = idle.wait(30)
        print(json.dumps({"paused": ok}), flush=True)
    elif cmd == "resume":
        run.set()
        print(json.dumps({"resumed": True}), flush=True)
    elif cmd == "exit":
        break
conn.close()
'''


class Probe:
    """A libvirt-python connection in a child process calling dom.info()
    every `interval` seconds; ``take()`` returns [(start, latency, error)]
    since the last take. ``pause()`` returns once no call is outstanding."""

    def __init__(self, uri, user="", password="", interval=0.005,
                 start_timeout=20.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE_SCRIPT, uri, user, password,
             str(interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        if not self._read(start_timeout).get("ready"):
            raise harness.HarnessError("probe did not start")

    def _read(self, timeout):
        t, res = harness.start_call(self.proc.stdout.readline)
        t.join(timeout)
        if t.is_alive():
            raise harness.HarnessError("probe: no answer in %.0f s" % timeout)
        if not res.value:
            err = ""
            try:
                self.proc.wait(2)
                err = self.proc.stderr.read()
            except Exception:
                pass
            raise harness.HarnessError("probe exited (%s): %s"
                                       % (self.proc.returncode, err[-2000:]))
        return json.loads(res.value)

    def _ask(self, op, timeout=35.0):
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def take(self):
        return [tuple(s) for s in self._ask("take")["samples"]]

    def pause(self):
        if not self._ask("pause")["paused"]:
            raise harness.HarnessError("probe call did not finish in 30 s")

    def resume(self):
        self._ask("resume")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                harness._signal_group(self.proc, 9)
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def latency_summary(samples):
    """(count, p50 ms, p99 ms, max ms, [errors]) of probe samples."""
    lats = [s[1] * 1000.0 for s in samples]
    errors = [s[2] for s in samples if s[2]]
    if not lats:
        return 0, None, None, None, errors
    return (len(lats), percentile(lats, 50), percentile(lats, 99), max(lats),
            errors)


# --------------------------------------------------------------------------
# a relay that holds or cuts libvirtd's frames
# --------------------------------------------------------------------------

class FaultRelay:
    """127.0.0.1:<port> -> libvirtd, copying gateway->libvirtd bytes as they
    come and libvirtd->gateway bytes frame by frame, so that a frame can be
    held back or cut in half.

    ``hold(pred)``: frames for which pred(header) is true (header: dict with
    prog, proc, type, serial, status, length) are kept back, in order, until
    ``release()``. ``cut(pred, keep)``: the next matching frame is sent
    only up to byte `keep` (default: its middle), then both sockets of that
    connection are closed (one shot).
    ``held()`` counts frames held back; ``cuts`` counts cuts made."""

    def __init__(self, target_port, target_host="127.0.0.1", io_timeout=0.2):
        self.target = (target_host, target_port)
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._hold_pred = None
        self._cut_pred = None
        self._cut_keep = None
        self._held = []             # (dst socket, frame bytes)
        self.cuts = 0
        self.nconns = 0
        self._socks = []
        self._threads = []
        self._stopping = threading.Event()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self._lsock.settimeout(io_timeout)
        self.port = self._lsock.getsockname()[1]
        self._spawn(self._accept_loop)

    def uri(self, path="default", driver="test"):
        return "%s+tcp://127.0.0.1:%d/%s" % (driver, self.port, path)

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                csock, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                usock = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                csock.close()
                continue
            for s in (csock, usock):
                s.settimeout(self.io_timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.nconns += 1
                self._socks += [csock, usock]
            self._spawn(self._copy, csock, usock)
            self._spawn(self._frames, usock, csock)

    def _send(self, dst, data):
        view = memoryview(data)
        deadline = time.monotonic() + 5.0
        while view:
            try:
                n = dst.send(view)
            except socket.timeout:
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise OSError("relay: peer did not read for 5 s")
                continue
            view = view[n:]

    @staticmethod
    def _shut(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _copy(self, src, dst):
        try:
            while not self._stopping.is_set():
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                self._send(dst, data)
        except OSError:
            pass
        finally:
            self._shut(dst, src)

    def _frames(self, src, dst):
        buf = bytearray()
        try:
            while not self._stopping.is_set():
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                buf += data
                while len(buf) >= harness.MIN_PACKET:
                    length = struct.unpack_from(">I", buf, 0)[0]
                    if length < harness.MIN_PACKET or len(buf) < length:
                        break
                    frame = bytes(buf[:length])
                    del buf[:length]
                    if self._route(frame, src, dst):
                        return
        except OSError:
            pass
        finally:
            self._shut(dst, src)

    def _route(self, frame, src, dst):
        """Send, hold or cut one frame; True when the connection was cut."""
        prog, vers, proc, mtype, serial, status = struct.unpack_from(
            ">IIiiIi", frame, 4)
        hdr = {"prog": prog, "proc": proc, "type": mtype, "serial": serial,
               "status": status, "length": len(frame)}
        with self._lock:
            if self._cut_pred is not None and self._cut_pred(hdr):
                self._cut_pred = None
                self.cuts += 1
                cut = True
                keep = self._cut_keep or len(frame) // 2
            else:
                cut = False
                if self._hold_pred is not None and self._hold_pred(hdr):
                    self._held.append((dst, frame))
                    return False
        if cut:
            self._send(dst, frame[:keep])
            self._shut(dst, src)
            return True
        self._send(dst, frame)
        return False

    def hold(self, pred):
        with self._lock:
            self._hold_pred = pred

    def held(self):
        with self._lock:
            return len(self._held)

    def release(self):
        """Stop holding; send what was held (to peers still connected)."""
        with self._lock:
            self._hold_pred = None
            held, self._held = self._held, []
        for dst, frame in held:
            try:
                self._send(dst, frame)
            except OSError:
                pass
        return len(held)

    def cut(self, pred, keep=None):
        with self._lock:
            self._cut_pred = pred
            self._cut_keep = keep

    def stop(self, timeout=3.0):
        self._stopping.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        self._shut(*socks)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
