"""Streams and events.

The gateway may refuse them with VIR_ERR_NO_SUPPORT (the first contract) or
relay them; either way the answer must be clean, and when relayed the
result must equal what libvirtd gives directly."""

import json
import subprocess
import sys
import textwrap
import time

import libvirt
import pytest

import harness
from harness import RawClient, virsh

NO_SUPPORT = harness.VIR_ERR_NO_SUPPORT


@pytest.fixture(scope="module")
def gw(shared_libvirtd, module_gateway_factory):
    return module_gateway_factory.single(shared_libvirtd.direct_uri)


def test_screenshot_stream(shared_libvirtd, gw, tmp_path):
    direct_png = tmp_path / "direct.png"
    via_png = tmp_path / "via.png"
    direct = virsh(shared_libvirtd.direct_uri, "screenshot", "test",
                   str(direct_png))
    assert direct.returncode == 0, direct.stderr      # the driver can do it
    via = virsh(gw.uri(), "screenshot", "test", str(via_png))
    if via.returncode != 0:
        assert via.returncode == 1
        assert "not supported" in via.stderr, via.stderr
    else:
        assert via.stdout.replace("via.png", "direct.png") == direct.stdout
        assert via_png.read_bytes() == direct_png.read_bytes()
    # the connection layer is fine afterwards
    assert virsh(gw.uri(), "list", "--name").stdout.split() == ["test"]


EVENTS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    gw_uri, direct_uri, name = sys.argv[1:4]
    out = {"events": {}, "register": {}}
    lock = threading.Lock()

    def make_cb(key):
        def cb(conn, dom, event, detail, opaque):
            with lock:
                out["events"].setdefault(key, []).append(
                    [dom.name(), event, detail])
        return cb

    conns = {"a": libvirt.open(gw_uri), "b": libvirt.open(gw_uri)}
    ids = {}
    for key, conn in conns.items():
        try:
            ids[key] = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, make_cb(key),
                None)
            out["register"][key] = ["ok", ids[key]]
        except libvirt.libvirtError as e:
            out["register"][key] = ["error", e.get_error_code(), str(e)]

    if ids:
        other = libvirt.open(direct_uri)
        xml = ("<domain type='test'><name>%s</name><memory>65536</memory>"
               "<os><type>hvm</type></os></domain>" % name)
        dom = other.defineXML(xml)
        dom.create()
        dom.destroy()
        dom.undefine()
        deadline = time.time() + 5
        while time.time() < deadline:
            with lock:
                if all(len([e for e in out["events"].get(k, [])
                            if e[0] == name]) >= 4 for k in ids):
                    break
            time.sleep(0.05)
        time.sleep(0.3)          # anything extra would arrive now
        for key, cid in ids.items():
            try:
                conns[key].domainEventDeregisterAny(cid)
                out.setdefault("deregister", {})[key] = "ok"
            except libvirt.libvirtError as e:
                out.setdefault("deregister", {})[key] = str(e)
        other.close()
    out["info"] = conns["a"].lookupByName("test").info()[:4]
    print(json.dumps(out))
""")


def run_events(gw_uri, direct_uri, name):
    r = subprocess.run([sys.executable, "-c", EVENTS_SCRIPT, gw_uri,
                        direct_uri, name],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=40)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_domain_lifecycle_events(shared_libvirtd, gw):
    lvd = shared_libvirtd
    # subscribers that vanish without deregistering must not disturb the
    # others (a python close() would keep the socket open while callbacks
    # hold references, so use raw sockets)
    for _ in range(3):
        with RawClient(port=gw.port) as c:
            c.handshake()
            c.call(316, harness.xdr_i32(0) + harness.xdr_u32(0))
    via = run_events(gw.uri(), lvd.direct_uri, "ev-via")
    assert via["info"] == [1, 8388608, 2097152, 2]
    reg = via["register"]
    if all(r[0] == "error" for r in reg.values()):
        for r in reg.values():
            assert r[1] == NO_SUPPORT, r
        return
    assert all(r[0] == "ok" for r in reg.values()), reg

    # relayed: both subscribers see exactly what a direct subscriber sees
    direct = run_events(lvd.direct_uri, lvd.direct_uri, "ev-direct")
    expected = [[n.replace("ev-direct", "ev-via"), e, d]
                for n, e, d in direct["events"]["a"]]
    assert [e[:2] for e in expected] == [
        ["ev-via", 0], ["ev-via", 2], ["ev-via", 5], ["ev-via", 1]]
    assert via["events"].get("a") == expected, via
    assert via["events"].get("b") == expected, via
    assert via["deregister"] == {"a": "ok", "b": "ok"}


def test_raw_event_register(shared_libvirtd, gw):
    # CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY (316):
    #   args int eventID, remote_domain dom (optional, absent here)
    #   ret  int callbackID
    # DOMAIN_EVENT_CALLBACK_LIFECYCLE (318) MESSAGE: int callbackID first
    with RawClient(port=gw.port) as c:
        c.handshake()
        pkt = c.call(316, harness.xdr_i32(0) + harness.xdr_u32(0))
        if pkt.status == harness.STATUS_ERROR:
            assert harness.decode_error(pkt.payload)["code"] == NO_SUPPORT
        else:
            assert len(pkt.payload) == 4
            cid = harness.XdrReader(pkt.payload).i32()
            other = libvirt.open(shared_libvirtd.direct_uri)
            try:
                other.defineXML(
                    "<domain type='test'><name>ev-raw</name><memory>65536"
                    "</memory><os><type>hvm</type></os></domain>").undefine()
            finally:
                other.close()
            got = []
            while len(got) < 2:
                ev = c.recv_packet(timeout=5.0)
                if ev.prog == harness.KEEPALIVE_PROGRAM:
                    continue
                assert (ev.prog, ev.type, ev.proc, ev.status) == \
                    (harness.REMOTE_PROGRAM, harness.TYPE_MESSAGE, 318, 0)
                r = harness.XdrReader(ev.payload)
                got.append((r.i32(), r.domain()["name"], r.i32()))
            assert got == [(cid, "ev-raw", 0), (cid, "ev-raw", 1)]
            pkt = c.call(317, harness.xdr_i32(cid))
            assert pkt.status == harness.STATUS_OK
        assert [d["name"] for d in c.list_all_domains()] == ["test"]


RESTART_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    events = []
    conn = libvirt.open(sys.argv[1])
    try:
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda c, dom, ev, detail, o: events.append([dom.name(), ev]),
            None)
        print("registered", flush=True)
    except libvirt.libvirtError as e:
        print("error %d" % e.get_error_code(), flush=True)
        sys.exit(0)
    sys.stdin.readline()            # the domain has been defined/undefined
    deadline = time.time() + 5
    while len(events) < 2 and time.time() < deadline:
        time.sleep(0.05)
    print(json.dumps({"events": events, "alive": conn.isAlive()}),
          flush=True)
""")


def test_events_survive_upstream_restart(libvirtd, gateway):
    """A subscription made through the gateway keeps delivering events
    after libvirtd was killed and restarted (the gateway registers again
    upstream)."""
    gw = gateway.single(libvirtd.direct_uri)
    proc = subprocess.Popen([sys.executable, "-c", RESTART_SCRIPT, gw.uri()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = harness.call_with_timeout(proc.stdout.readline,
                                          timeout=20).strip()
        if first.startswith("error"):
            assert first == "error %d" % NO_SUPPORT
            return
        assert first == "registered", proc.stderr.read()
        libvirtd.kill9()
        libvirtd.start()
        # wait until the gateway is connected upstream again
        assert harness.wait_until(lambda: libvirtd.nclients() >= 1, 10.0)
        time.sleep(0.5)
        other = libvirt.open(libvirtd.direct_uri)
        try:
            other.defineXML(
                "<domain type='test'><name>after-restart</name>"
                "<memory>65536</memory><os><type>hvm</type></os>"
                "</domain>").undefine()
        finally:
            other.close()
        proc.stdin.write("\n")
        proc.stdin.flush()
        line = harness.call_with_timeout(proc.stdout.readline, timeout=20)
        out = json.loads(line)
        assert out["alive"] == 1
        assert out["events"] == [["after-restart", 0], ["after-restart", 1]]
    finally:
        proc.kill()
        proc.wait(5)
