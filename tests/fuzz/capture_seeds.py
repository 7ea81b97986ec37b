#!/usr/bin/python3
"""Capture real libvirt traffic and write it as seed inputs of the fuzz harnesses.

    client (virsh, libvirt-python) --> relay C --> virtmux --> relay U --> libvirtd
                                       records                 records
                                       both ways               both ways

A private libvirtd with the test driver (tests/e2e/harness.py's Libvirtd) and the built
virtmux (VIRTMUX_BUILD, default <repo>/build) run behind two recording relays. virsh and
libvirt-python then do ordinary work: list, dominfo, read-only connections, event
registration with a suspend/resume, a screenshot stream, an error. What crossed each relay
becomes seeds (files named capture-*) in tests/fuzz/corpus/<harness>/:

  fuzz_frame     whole byte streams and single packets, both directions
  fuzz_xdr       CONNECT_OPEN arguments, error payloads, call arguments under reader programs
  fuzz_upstream  what libvirtd sent to a gateway link (handshake replies, replies, events),
                 also as it would follow a SASL login
  fuzz_session   what clients sent, in fuzz_session's op layout
  fuzz_config    the example configs of config/ with the names clients opened

Run as root (libvirtd), after building:  /usr/bin/python3 tests/fuzz/capture_seeds.py
Existing capture-* files are replaced; other corpus files are left alone.
"""
import glob
import os
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))

import harness  # noqa: E402

CORPUS = os.path.join(HERE, "corpus")
PROG_REMOTE = 0x20008086
HDR = struct.Struct(">IIIiIII")
MAX_SEED = 8192


class Relay:
    """Accepts on a loopback port, connects each client to `target`, copies both ways and
    keeps every byte: conns[i] = {"c2s": bytearray, "s2c": bytearray}."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        self.stopping = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            rec = {"c2s": bytearray(), "s2c": bytearray()}
            with self.lock:
                self.conns.append(rec)
            for src, dst, key in ((c, u, "c2s"), (u, c, "s2c")):
                t = threading.Thread(target=self._copy, args=(src, dst, rec[key]), daemon=True)
                t.start()
                self.threads.append(t)

    def _copy(self, src, dst, buf):
        src.settimeout(0.2)
        while not self.stopping:
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            with self.lock:
                buf += data
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.stopping = True
        self.lsock.close()
        for t in self.threads:
            t.join(5)


def packets(stream):
    """Split a byte stream into whole packets (bytes)."""
    out, off = [], 0
    while off + 4 <= len(stream):
        n = struct.unpack_from(">I", stream, off)[0]
        if n < 28 or off + n > len(stream):
            break
        out.append(bytes(stream[off:off + n]))
        off += n
    return out


def header(pkt):
    return HDR.unpack_from(pkt, 0)  # len, prog, vers, proc, type, serial, status


def run(argv, timeout=30):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    print("capture: %s -> %d" % (" ".join(argv[3:]), r.returncode))


def drive_virsh(uri):
    for cmd in (["list", "--all"], ["dominfo", "test"], ["domstate", "test"],
                ["net-list", "--all"], ["nodeinfo"], ["dumpxml", "test"],
                ["dominfo", "no-such-domain"], ["uri"], ["version"]):
        run(["virsh", "-c", uri] + cmd)
    run(["virsh", "-r", "-c", uri, "list"])
    run(["virsh", "-r", "-c", uri, "suspend", "test"])  # refused: read-only
    run(["virsh", "-c", uri, "screenshot", "test", "/tmp/virtmux-capture-shot.ppm"])


def drive_python(uri):
    """Events (registered, one lifecycle event each way) and a screenshot stream."""
    code = r"""
import sys, threading, time, libvirt
libvirt.registerErrorHandler(lambda *a: None, None)
libvirt.virEventRegisterDefaultImpl()
stop = False
def loop():
    while not stop:
        libvirt.virEventRunDefaultImpl()
t = threading.Thread(target=loop, daemon=True); t.start()
c = libvirt.open(sys.argv[1])
seen = []
cb = c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                              lambda *a: seen.append(a[2]), None)
ncb = c.networkEventRegisterAny(None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                                lambda *a: None, None)
d = c.lookupByName("test")
d.suspend(); d.resume()
time.sleep(0.5)
st = c.newStream(0)
d.screenshot(st, 0, 0)
try:
    while st.recv(65536):
        pass
    st.finish()
except libvirt.libvirtError:
    st.abort()
c.domainEventDeregisterAny(cb)
c.networkEventDeregisterAny(ncb)
c.close()
stop = True
print("events seen:", seen)
"""
    r = subprocess.run(["/usr/bin/python3", "-c", code, uri], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    print("capture: python events + stream -> %d %s" % (r.returncode, r.stdout.decode().strip()))


def write(harness_name, name, data):
    d = os.path.join(CORPUS, harness_name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "capture-" + name), "wb") as f:
        f.write(data[:MAX_SEED])


def clear_captures():
    for f in glob.glob(os.path.join(CORPUS, "*", "capture-*")):
        os.unlink(f)


def seeds_frame(client, upstream):
    for i, rec in enumerate(client + upstream):
        for key in ("c2s", "s2c"):
            if rec[key]:
                write("fuzz_frame", "stream-%d-%s" % (i, key), bytes([i * 37 & 255]) + rec[key])
    kinds = set()
    for rec in client + upstream:
        for key in ("c2s", "s2c"):
            for p in packets(rec[key]):
                h = header(p)
                k = (h[1], h[3], h[4], h[6])
                if k in kinds:
                    continue
                kinds.add(k)
                write("fuzz_frame", "pkt-%x-%d-%d-%d" % k, bytes([len(kinds) & 255]) + p)


def seeds_xdr(client, upstream):
    n = 0
    for rec in client + upstream:
        for p in packets(rec["c2s"]) + packets(rec["s2c"]):
            h = header(p)
            payload = p[28:]
            if h[1] == PROG_REMOTE and h[3] == 1 and h[4] == 0:
                write("fuzz_xdr", "open-%d" % n, b"\x01" + payload)
            elif h[4] == 1 and h[6] == 1:
                write("fuzz_xdr", "error-%d" % n, b"\x04" + payload)
            elif h[4] == 0 and payload and n % 3 == 0:
                # a reader program: string, skip, u32 x2, opt string, nil chars, re-encode
                ops = bytes([2, 4, 0, 1, 3, 5, 6])
                write("fuzz_xdr", "args-%d" % n, b"\x00" + bytes([len(ops)]) + ops + payload)
            n += 1
    # SASL token pairs are not in this capture (auth none): two hand-made ones.
    tok = b"n,,n=alice,r=abc"
    pair = struct.pack(">ii", 0, len(tok)) + b"".join(struct.pack(">I", b) for b in tok)
    mech = b"SCRAM-SHA-256"
    write("fuzz_xdr", "sasl-start", b"\x02" + struct.pack(">I", len(mech)) + mech + b"\0\0\0"
          + pair)
    write("fuzz_xdr", "sasl-step", b"\x03" + pair)


def seeds_upstream(upstream):
    for i, rec in enumerate(upstream):
        s2c = bytes(rec["s2c"])
        if not s2c:
            continue
        # no handshake prefix (libvirtd's own replies), 8 calls
        write("fuzz_upstream", "link-%d-raw" % i, bytes([0x38]) + s2c)
        # the stub writes the handshake, then what libvirtd sent after it
        after = b"".join(packets(s2c)[3:])
        write("fuzz_upstream", "link-%d-ready" % i, bytes([0x3b]) + after)
        write("fuzz_upstream", "link-%d-ready-hangup" % i, bytes([0x1f]) + after)
        # the same after a SASL login (mode bit 7): two more handshake serials before them
        shifted = b"".join(p[:20] + struct.pack(">I", header(p)[5] + 2) + p[24:]
                           if header(p)[4] == 1 else p for p in packets(s2c)[3:])
        write("fuzz_upstream", "link-%d-sasl-ready" % i, bytes([0xbb]) + shifted)


def seeds_session(client):
    """fuzz_session layout: config byte, then ops [client<<4 | 0, LEN, bytes] and pumps."""
    for i, rec in enumerate(client):
        c2s = bytes(rec["c2s"])
        if not c2s:
            continue
        out = bytearray(b"\x00")
        chunks = [c2s[o:o + 255] for o in range(0, len(c2s), 255)]
        for j, ch in enumerate(chunks):
            op = bytes([0x00, len(ch)]) + ch
            if len(out) + len(op) + 2 > MAX_SEED:
                break
            out += op
            if j % 2 == 1:
                out += b"\x03\x10"
        out += b"\x03\x40"
        write("fuzz_session", "client-%d" % i, bytes(out))


def seeds_config(client):
    names = set()
    for rec in client:
        for p in packets(rec["c2s"]):
            h = header(p)
            if h[1] == PROG_REMOTE and h[3] == 1 and len(p) >= 36 and \
                    struct.unpack_from(">I", p, 28)[0] == 1:
                n = struct.unpack_from(">I", p, 32)[0]
                names.add(p[36:36 + n])
    names |= {b"test:///hv1/default", b"qemu:///embedded/system?x=1", b""}
    tail = b"\0" + b"\n".join(sorted(names))
    for path in sorted(glob.glob(os.path.join(REPO, "config", "*.json"))):
        with open(path, "rb") as f:
            write("fuzz_config", os.path.basename(path)[:-5], f.read() + tail)


def main():
    lv = harness.Libvirtd(name="capture")
    lv.start()
    up_relay = Relay(lv.port)
    cfg = harness.make_config(
        [harness.upstream_entry("embedded", "test+tcp://127.0.0.1:%d/default" % up_relay.port,
                                max_connections=2, max_inflight=4)],
        default_upstream="embedded")
    gw = harness.Virtmux(cfg)
    gw.start()
    cl_relay = Relay(gw.port)
    try:
        uri = "test+tcp://127.0.0.1:%d/default" % cl_relay.port
        drive_virsh(uri)
        drive_python(uri)
        time.sleep(0.5)
    finally:
        cl_relay.stop()
        gw.stop()
        up_relay.stop()
        lv.stop()
        gw.cleanup()
        lv.cleanup()
    client, upstream = cl_relay.conns, up_relay.conns
    print("capture: %d client connections, %d upstream connections" % (len(client),
                                                                        len(upstream)))
    if not client or not upstream:
        sys.exit("capture: nothing recorded")
    clear_captures()
    seeds_frame(client, upstream)
    seeds_xdr(client, upstream)
    seeds_upstream(upstream)
    seeds_session(client)
    seeds_config(client)
    total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(CORPUS, "*", "capture-*")))
    print("capture: %d seed files, %d bytes" % (
        len(glob.glob(os.path.join(CORPUS, "*", "capture-*"))), total))


if __name__ == "__main__":
    main()
