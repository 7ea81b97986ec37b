"""bench/loadgen: a one-second smoke run through the gateway for every
procedure kind, and proof that it reports what is wrong.

The smoke runs use a real libvirtd behind the gateway. The error checks use
both real refusals (a domain that does not exist, a name libvirtd cannot
open) and a scripted fake server that answers the load calls with defects
only loadgen's own checks can catch (an implausible payload, a truncated
one, a serial nobody asked for); the same fake without defects must give a
clean run, so the defects, not the fake, are what the checks see.
"""

import json
import os
import socket
import struct
import subprocess
import threading

import pytest

import harness

LOADGEN = harness.build_dir() / "bench" / "loadgen"


def run_loadgen(*args, timeout=60):
    """Run loadgen; returns (exit status, parsed JSON report)."""
    if not os.access(str(LOADGEN), os.X_OK):
        pytest.fail("%s not found: run scripts/build.sh" % LOADGEN,
                    pytrace=False)
    r = subprocess.run([str(LOADGEN)] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        pytest.fail("loadgen printed no JSON (exit %d)\nstdout: %s\n"
                    "stderr: %s" % (r.returncode, r.stdout, r.stderr))
    return r.returncode, report


@pytest.fixture(scope="module")
def setup(shared_libvirtd, module_gateway_factory):
    lvd = shared_libvirtd
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri, max_connections=2,
                                max_inflight=4)],
        default_upstream="hv1")
    gw = module_gateway_factory(cfg)
    return lvd, gw


@pytest.mark.parametrize("proc", ["getinfo", "listall", "allstats"])
def test_smoke_through_gateway(setup, proc):
    lvd, gw = setup
    rc, rep = run_loadgen("--uri-tcp", "%s:%d" % (gw.host, gw.port),
                          "-c", 6, "-d", 2, "-t", 1, "--warmup", 0.2,
                          "--proc", proc,
                          "--pid", "virtmux=%d" % gw.proc.pid,
                          "--pid", "libvirtd=%d" % lvd.proc.pid)
    assert rep["errors"] == 0, rep["first_error"]
    assert rc == 0
    assert rep["proc"] == proc and rep["connections"] == 6
    assert rep["calls"] > 0
    assert 0.9 < rep["window_s"] < 5
    assert 0 < rep["p50_us"] <= rep["p99_us"] <= rep["max_us"]
    assert set(rep["cpu"]) == {"loadgen", "virtmux", "libvirtd"}
    assert rep["cpu"]["virtmux"]["pid"] == gw.proc.pid


def test_smoke_direct_unix(setup):
    """The same generator straight to libvirtd's UNIX socket (the benchmark's
    "direct" column goes there over TCP, this covers --unix)."""
    lvd, _gw = setup
    rc, rep = run_loadgen("--unix", lvd.sock, "-c", 3, "-d", 2, "-t", 1,
                          "--warmup", 0.2, "--proc", "listall")
    assert (rc, rep["errors"]) == (0, 0), rep["first_error"]
    assert rep["calls"] > 0


def test_calls_limit_ends_the_window(setup):
    _lvd, gw = setup
    rc, rep = run_loadgen("--uri-tcp", "%s:%d" % (gw.host, gw.port),
                          "-c", 2, "-d", 2, "-n", 500, "-t", 30,
                          "--warmup", 0)
    assert (rc, rep["errors"]) == (0, 0), rep["first_error"]
    assert rep["calls"] == 500
    assert rep["window_s"] < 30


def test_missing_domain_is_an_error(setup):
    _lvd, gw = setup
    rc, rep = run_loadgen("--uri-tcp", "%s:%d" % (gw.host, gw.port),
                          "-c", 3, "-d", 2, "-t", 1, "--warmup", 0,
                          "--domain", "no-such-domain")
    assert rc == 1
    assert rep["errors"] == 3 and rep["setup_errors"] == 3
    assert rep["calls"] == 0
    assert "DOMAIN_LOOKUP_BY_NAME failed" in rep["first_error"]
    assert "no-such-domain" in rep["first_error"] or \
        "not found" in rep["first_error"]


def test_unopenable_name_is_an_error(setup):
    _lvd, gw = setup
    rc, rep = run_loadgen("--uri-tcp", "%s:%d" % (gw.host, gw.port),
                          "-c", 2, "-t", 1, "--warmup", 0,
                          "--name", "bogus:///nowhere", "--proc", "listall")
    assert rc == 1
    assert rep["errors"] == 2 and rep["calls"] == 0
    assert "CONNECT_OPEN failed" in rep["first_error"]


def test_nobody_listening_is_an_error(tmp_path):
    rc, rep = run_loadgen("--unix", tmp_path / "none.sock", "-c", 2,
                          "-t", 0.2, "--warmup", 0)
    assert rc == 1
    assert rep["errors"] == 2 and rep["calls"] == 0


# --------------------------------------------------------------------------
# a scripted server: right handshake, then GET_INFO replies with defects
# --------------------------------------------------------------------------

GOOD_INFO = (struct.pack(">I", 1) + struct.pack(">QQ", 8388608, 2097152)
             + struct.pack(">I", 2) + struct.pack(">Q", 123456789))
DOMAIN = (harness.xdr_string("test") + bytes(range(16))
          + harness.xdr_i32(1))
DEFECT_EVERY = 10


class FakeDaemon:
    """Answers AUTH_LIST, CONNECT_OPEN, DOMAIN_LOOKUP_BY_NAME and
    CONNECT_CLOSE properly; every DEFECT_EVERY-th DOMAIN_GET_INFO gets the
    defect `mode` ("none", "bad_state", "truncated", "error", "serial").
    With ping=True a keepalive PING is sent after CONNECT_OPEN and the
    PONGs that come back are counted."""

    def __init__(self, path, mode, ping=False):
        self.path = str(path)
        self.mode = mode
        self.ping = ping
        self.pongs = 0
        self.info_calls = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,),
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _reply(self, conn, pkt, payload=b"", status=harness.STATUS_OK,
               serial=None):
        conn.sendall(harness.build_packet(
            pkt.prog, pkt.vers, pkt.proc, harness.TYPE_REPLY,
            pkt.serial if serial is None else serial, status, payload))

    def _answer_info(self, conn, pkt):
        with self.lock:
            self.info_calls += 1
            defect = self.info_calls % DEFECT_EVERY == 0
        mode = self.mode if defect else "none"
        if mode == "bad_state":
            self._reply(conn, pkt, struct.pack(">I", 99) + GOOD_INFO[4:])
        elif mode == "truncated":
            self._reply(conn, pkt, GOOD_INFO[:-4])
        elif mode == "error":
            err = (harness.xdr_i32(1) + harness.xdr_i32(10)
                   + harness.xdr_opt_string("internal error: scripted")
                   + harness.xdr_i32(2)            # level
                   + harness.xdr_u32(0) * 4        # dom, str1..str3 absent
                   + harness.xdr_i32(0) * 2        # int1, int2
                   + harness.xdr_u32(0))           # net absent
            self._reply(conn, pkt, err, status=harness.STATUS_ERROR)
        elif mode == "serial":
            self._reply(conn, pkt, GOOD_INFO, serial=pkt.serial + 100000)
        else:
            self._reply(conn, pkt, GOOD_INFO)

    def _serve(self, conn):
        conn.settimeout(0.2)
        buf = b""
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack(">I", buf[:4])[0]
                    if len(buf) < n:
                        break
                    pkt, buf = harness.parse_packet(buf[:n]), buf[n:]
                    try:
                        if not self._handle(conn, pkt):
                            return
                    except OSError:     # loadgen hung up (serial mode)
                        return

    def _handle(self, conn, pkt):
        if pkt.prog == harness.KEEPALIVE_PROGRAM:
            if pkt.proc == harness.PROC_KEEPALIVE_PONG:
                with self.lock:
                    self.pongs += 1
            return True
        if pkt.proc == harness.PROC_AUTH_LIST:
            self._reply(conn, pkt, harness.xdr_u32(1) + harness.xdr_u32(0))
        elif pkt.proc == harness.PROC_CONNECT_OPEN:
            self._reply(conn, pkt)
            if self.ping:
                conn.sendall(harness.build_packet(
                    harness.KEEPALIVE_PROGRAM, 1, harness.PROC_KEEPALIVE_PING,
                    harness.TYPE_MESSAGE, 0))
        elif pkt.proc == harness.PROC_DOMAIN_LOOKUP_BY_NAME:
            self._reply(conn, pkt, DOMAIN)
        elif pkt.proc == harness.PROC_DOMAIN_GET_INFO:
            self._answer_info(conn, pkt)
        elif pkt.proc == harness.PROC_CONNECT_CLOSE:
            self._reply(conn, pkt)
            return False
        return True

    def close(self):
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(mode, ping=False):
        f = FakeDaemon(tmp_path / ("fake-%d.sock" % len(made)), mode, ping)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def test_fake_without_defects_is_clean(fake):
    """The control: the fake itself passes every check, and a keepalive PING
    it sends is answered with a PONG."""
    f = fake("none", ping=True)
    rc, rep = run_loadgen("--unix", f.path, "-c", 2, "-d", 2, "-t", 0.5,
                          "--warmup", 0)
    assert (rc, rep["errors"]) == (0, 0), rep["first_error"]
    assert rep["calls"] > DEFECT_EVERY
    assert harness.wait_until(lambda: f.pongs == 2, 5.0), f.pongs


@pytest.mark.parametrize("mode,text", [
    ("bad_state", "implausible 32-byte reply"),
    ("truncated", "implausible 28-byte reply"),
    ("error", "internal error: scripted"),
])
def test_defective_replies_are_counted(fake, mode, text):
    f = fake(mode)
    rc, rep = run_loadgen("--unix", f.path, "-c", 2, "-d", 2, "-t", 0.5,
                          "--warmup", 0)
    assert rc == 1
    assert rep["errors"] > 0 and rep["setup_errors"] == 0
    assert text in rep["first_error"]
    # every defect is one error and nothing else is: the defects come from
    # every DEFECT_EVERY-th call the fake answered
    assert rep["errors"] == f.info_calls // DEFECT_EVERY
    assert rep["calls"] > 0


def test_reply_with_unknown_serial_ends_the_connection(fake):
    f = fake("serial")
    rc, rep = run_loadgen("--unix", f.path, "-c", 2, "-d", 2, "-t", 0.5,
                          "--warmup", 0)
    assert rc == 1
    assert rep["errors"] == 2                      # one per connection
    assert "matches no call in flight" in rep["first_error"]
    assert rep["calls"] < 2 * DEFECT_EVERY
