"""A counting TCP relay between the gateway and libvirtd.

The gateway's upstream URI points at the tap (``test+tcp://127.0.0.1:PORT/
default``); the tap connects every accepted socket to libvirtd's TCP port and
copies bytes both ways unchanged. The gateway->libvirtd direction is also cut
into libvirt RPC frames (4-byte big-endian length that counts itself, then
prog, vers, proc, type, serial, status) and each one is recorded. That record
is the independent proof of what reached libvirtd: the gateway's own log and
replies cannot vouch for what it did not forward.

Bounded everywhere: at most ``max_conns`` relayed connections, socket
timeouts on every blocking call, and ``stop()`` closes every socket and joins
every thread with a deadline. Nothing here depends on pytest.
"""

import socket
import struct
import threading
import time
from collections import namedtuple

LEN_WORD = 4
HEADER_LEN = 24
MIN_FRAME = LEN_WORD + HEADER_LEN
MAX_FRAME = LEN_WORD + 32 * 1024 * 1024

KEEPALIVE_PROGRAM = 0x6B656570

# One recorded frame. `conn` numbers the relayed connection (0, 1, ...),
# `seq` orders frames across all connections, `args` holds the first
# ARGS_KEPT bytes of the payload (what follows the 28-byte header).
Frame = namedtuple("Frame", "seq conn prog vers proc type serial status "
                            "length args")

ARGS_KEPT = 4096


class FrameParser:
    """Incremental frame splitter for one direction of one connection."""

    def __init__(self):
        self.buf = bytearray()
        self.broken = None          # why parsing stopped, if it did

    def feed(self, data):
        """Add bytes; return the list of complete frames as tuples
        (length, prog, vers, proc, type, serial, status, args)."""
        out = []
        if self.broken:
            return out
        self.buf += data
        while len(self.buf) >= LEN_WORD:
            length = struct.unpack_from(">I", self.buf, 0)[0]
            if length < MIN_FRAME or length > MAX_FRAME:
                self.broken = "bad length word %d" % length
                self.buf.clear()
                break
            if len(self.buf) < length:
                break
            prog, vers, proc, mtype, serial, status = struct.unpack_from(
                ">IIiiIi", self.buf, LEN_WORD)
            args = bytes(self.buf[MIN_FRAME:min(length, MIN_FRAME + ARGS_KEPT)])
            out.append((length, prog, vers, proc, mtype, serial, status, args))
            del self.buf[:length]
        return out


class Tap:
    """Relay 127.0.0.1:<port> -> (target_host, target_port), recording the
    frames sent towards the target.

    ``frames()`` returns every frame recorded so far; ``mark()`` and
    ``since(mark)`` bracket a part of a test; ``calls(...)`` filters CALL
    frames by program/procedure.
    """

    def __init__(self, target_port, target_host="127.0.0.1",
                 listen_host="127.0.0.1", port=0, max_conns=32,
                 io_timeout=0.2):
        self.target = (target_host, target_port)
        self.max_conns = max_conns
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._frames = []
        self._reply_frames = []
        self._seq = 0
        self._conns = []            # (client_sock, upstream_sock)
        self._threads = []
        self._stopping = threading.Event()
        self.nconns = 0
        self.refused = 0            # accepted beyond max_conns, or target down
        self.parse_errors = []
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((listen_host, port))
        self._lsock.listen(16)
        self._lsock.settimeout(io_timeout)
        self.host, self.port = self._lsock.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop,
                                          name="tap-accept", daemon=True)
        self._acceptor.start()

    # -- addresses ---------------------------------------------------------

    def uri(self, path="default", driver="test"):
        return "%s+tcp://%s:%d/%s" % (driver, self.host, self.port, path)

    # -- relay -------------------------------------------------------------

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                csock, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                too_many = self.nconns >= self.max_conns
                conn_id = self.nconns
            if too_many:
                self.refused += 1
                csock.close()
                continue
            try:
                usock = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                self.refused += 1
                csock.close()
                continue
            for s in (csock, usock):
                s.settimeout(self.io_timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.nconns += 1
                self._conns.append((csock, usock))
            up = threading.Thread(target=self._pump,
                                  args=(conn_id, csock, usock, True),
                                  name="tap-up-%d" % conn_id, daemon=True)
            down = threading.Thread(target=self._pump,
                                    args=(conn_id, usock, csock, False),
                                    name="tap-down-%d" % conn_id, daemon=True)
            with self._lock:
                self._threads += [up, down]
            up.start()
            down.start()

    def _record(self, conn_id, upward, parsed):
        with self._lock:
            for (length, prog, vers, proc, mtype, serial, status,
                 args) in parsed:
                f = Frame(self._seq, conn_id, prog, vers, proc, mtype, serial,
                          status, length, args)
                self._seq += 1
                (self._frames if upward else self._reply_frames).append(f)

    def _pump(self, conn_id, src, dst, upward):
        parser = FrameParser()
        reported = False
        try:
            while not self._stopping.is_set():
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                parsed = parser.feed(data)
                if parsed:
                    self._record(conn_id, upward, parsed)
                if parser.broken and not reported:
                    # keep relaying; parsing of this direction stops here
                    reported = True
                    with self._lock:
                        self.parse_errors.append((conn_id, upward,
                                                  parser.broken))
                deadline = time.monotonic() + 5.0
                view = memoryview(data)
                while view and not self._stopping.is_set():
                    try:
                        n = dst.send(view)
                    except socket.timeout:
                        if time.monotonic() > deadline:
                            raise OSError("tap: peer did not read for 5 s")
                        continue
                    view = view[n:]
        except OSError:
            pass
        finally:
            # one side gone: pass the EOF on, then let both sockets close
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- lifecycle ---------------------------------------------------------

    def stop(self, timeout=3.0):
        self._stopping.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for pair in conns:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for t in [self._acceptor] + threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for pair in conns:
            for s in pair:
                try:
                    s.close()
                except OSError:
                    pass
        return not any(t.is_alive() for t in [self._acceptor] + threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- what was seen -----------------------------------------------------

    def frames(self):
        """Frames gateway -> libvirtd, in arrival order."""
        with self._lock:
            return list(self._frames)

    def reply_frames(self):
        """Frames libvirtd -> gateway, in arrival order."""
        with self._lock:
            return list(self._reply_frames)

    def mark(self):
        with self._lock:
            return self._seq

    def since(self, mark):
        return [f for f in self.frames() if f.seq >= mark]

    def calls(self, mark=0, prog=None, proc=None):
        """CALL frames (type 0) towards libvirtd after mark."""
        return [f for f in self.since(mark)
                if f.type == 0 and (prog is None or f.prog == prog)
                and (proc is None or f.proc == proc)]

    def non_keepalive(self, mark=0):
        return [f for f in self.since(mark) if f.prog != KEEPALIVE_PROGRAM]

    def wait_for(self, predicate, timeout=5.0, interval=0.02):
        """Poll predicate(frames) until true or timeout; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            v = predicate(self.frames())
            if v or time.monotonic() >= deadline:
                return v
            time.sleep(interval)


# --------------------------------------------------------------------------
# the other independent observers: libvirtd's own state, the admin endpoint
# --------------------------------------------------------------------------

def libvirtd_state(uri, timeout=15.0):
    """What a policy test must not have changed, read over a direct (not
    gateway) connection: domains with their state and XML, networks, storage
    pools and volumes, interfaces, node devices. Bounded by timeout."""
    import libvirt   # only /usr/bin/python3 has it; tap itself does not need it

    def read():
        conn = libvirt.open(uri)
        try:
            doms = sorted(
                (d.name(), d.UUIDString(), d.ID(), d.info()[0],
                 d.isPersistent(), d.autostart(), d.hasManagedSaveImage(0),
                 d.snapshotNum(0), len(d.listAllCheckpoints(0)),
                 d.XMLDesc(0))
                for d in conn.listAllDomains(0))
            nets = sorted((n.name(), n.isActive(), n.autostart(),
                           n.XMLDesc(0))
                          for n in conn.listAllNetworks(0))
            pools = sorted((p.name(), p.isActive(), p.autostart(),
                            sorted(p.listVolumes()) if p.isActive() else [])
                           for p in conn.listAllStoragePools(0))
            ifaces = sorted((i.name(), i.isActive())
                            for i in conn.listAllInterfaces(0))
            devs = sorted(d.name() for d in conn.listAllDevices(0))
            return {"domains": doms, "networks": nets, "pools": pools,
                    "interfaces": ifaces, "nodedevs": devs}
        finally:
            conn.close()

    result = {}

    def run():
        try:
            result["value"] = read()
        except Exception as e:   # reported to the caller below
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError("reading libvirtd state over %s took more than "
                             "%.0f s" % (uri, timeout))
    if "error" in result:
        raise result["error"]
    return result["value"]


def admin_status(address, timeout=5.0):
    """GET /status from the gateway's admin endpoint ("host:port")."""
    import json
    import urllib.request
    with urllib.request.urlopen("http://%s/status" % address,
                                timeout=timeout) as r:
        return json.loads(r.read().decode())
