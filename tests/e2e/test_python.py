"""libvirt-python through the gateway, with and without an event loop."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import libvirt
import pytest

from harness import call_with_timeout


def snapshot(uri, readonly=False):
    """What a typical script reads from a connection."""
    conn = (libvirt.openReadOnly if readonly else libvirt.open)(uri)
    try:
        doms = conn.listAllDomains()
        dom = conn.lookupByName("test")
        info = dom.info()
        result = {
            "domains": sorted(d.name() for d in doms),
            "info": info[:4],            # [4] is wall-clock based CPU time
            "cpu_time_positive": info[4] > 0,
            "uuid": dom.UUIDString(),
            "state": dom.state(),
            "xml": dom.XMLDesc(0),
            "type": conn.getType(),
            "version": conn.getVersion(),
            "libversion": conn.getLibVersion(),
            "hostname": conn.getHostname(),
            "networks": sorted(conn.listNetworks()),
            "pools": sorted(p.name() for p in conn.listAllStoragePools()),
            "nodeinfo": conn.getInfo(),
            "caps": conn.getCapabilities(),
            "alive": conn.isAlive(),
            "uri": conn.getURI(),
        }
    finally:
        result_close = conn.close()
    result["close"] = result_close
    return result


@pytest.fixture
def gw(libvirtd, gateway):
    return gateway.single(libvirtd.direct_uri,
                          pool={"max_connections": 4, "max_inflight": 4})


def test_no_event_loop_same_as_direct(libvirtd, gw):
    via = call_with_timeout(snapshot, gw.uri())
    direct = call_with_timeout(snapshot, libvirtd.direct_uri)
    assert via.pop("uri") == gw.uri()
    direct.pop("uri")
    assert via == direct
    assert via["domains"] == ["test"]
    assert via["close"] >= 0


def test_readonly_same_as_direct(libvirtd, gw):
    via = call_with_timeout(snapshot, gw.uri(), readonly=True)
    direct = call_with_timeout(snapshot, libvirtd.direct_uri, readonly=True)
    via.pop("uri")
    direct.pop("uri")
    assert via == direct


def test_error_code_and_domain_pass_through(libvirtd, gw):
    def lookup(uri):
        conn = libvirt.open(uri)
        try:
            conn.lookupByName("missing-domain")
        except libvirt.libvirtError as e:
            return (e.get_error_code(), e.get_error_domain(),
                    e.get_error_message())
        finally:
            conn.close()
        return None
    via = call_with_timeout(lookup, gw.uri())
    direct = call_with_timeout(lookup, libvirtd.direct_uri)
    assert via is not None
    assert via == direct


def test_many_calls_on_one_connection(libvirtd, gw):
    conn = libvirt.open(gw.uri())
    try:
        dom = conn.lookupByName("test")
        expected = dom.info()[:4]
        for _ in range(200):
            assert dom.info()[:4] == expected
    finally:
        conn.close()


def test_no_ping_to_clients_without_event_loop(libvirtd, gateway):
    """A client without an event loop never asks for keepalive; a PING sent
    to it would make libvirt drop the connection. Idle it for longer than
    several gateway keepalive intervals, then use it again."""
    gw = gateway.single(libvirtd.direct_uri,
                        keepalive={"interval_s": 1, "count": 2})
    conn = libvirt.open(gw.uri())
    try:
        dom = conn.lookupByName("test")
        first = call_with_timeout(dom.info, timeout=10)
        time.sleep(3.5)
        again = call_with_timeout(dom.info, timeout=10)
        assert again[:4] == first[:4]
        assert conn.isAlive() == 1
    finally:
        conn.close()


# The event-loop case runs in a child interpreter: virEventRegisterDefaultImpl
# is process-wide and irreversible, and would change how every later
# connection of this pytest process behaves.
EVENT_LOOP_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import libvirt

    libvirt.registerErrorHandler(lambda *a: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()

    uri = sys.argv[1]
    idle = float(sys.argv[2])
    out = {}
    conn = libvirt.open(uri)
    out["keepalive"] = conn.setKeepAlive(1, 3)
    dom = conn.lookupByName("test")
    out["before"] = dom.info()[:4]
    out["domains"] = sorted(d.name() for d in conn.listAllDomains())
    time.sleep(idle)
    out["alive_after_idle"] = conn.isAlive()
    try:
        out["after"] = dom.info()[:4]
        out["hostname"] = conn.getHostname()
    except libvirt.libvirtError as e:
        out["error"] = str(e)
    out["close"] = conn.close()
    print(json.dumps(out))
""")


def run_event_loop_client(uri, idle):
    r = subprocess.run([sys.executable, "-c", EVENT_LOOP_SCRIPT, uri,
                        str(idle)],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_event_loop_keepalive_per_hop(libvirtd_factory, gateway):
    # libvirtd pings the gateway's upstream socket every second and the
    # gateway pings its client every second, while the client pings the
    # gateway every second: an idle period of 4 s only survives if every hop
    # answers PINGs.
    lvd = libvirtd_factory(keepalive_interval=1, keepalive_count=2)
    gw = gateway.single(lvd.direct_uri,
                        pool={"max_connections": 2, "max_inflight": 4,
                              "idle_timeout_s": 60},
                        keepalive={"interval_s": 1, "count": 2})
    holder = {}

    def client():
        try:
            holder["r"] = run_event_loop_client(gw.uri(), 4.0)
        except BaseException as e:
            holder["e"] = e

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(1.5)             # the client is connected and idle by now
    ids_before = sorted(c["id"] for c in lvd.clients())
    t.join(40)
    assert not t.is_alive(), "event-loop client hung"
    if "e" in holder:
        raise holder["e"]
    via = holder["r"]
    ids_after = sorted(c["id"] for c in lvd.clients())

    direct = run_event_loop_client(lvd.direct_uri, 0.5)
    assert "error" not in via, via
    assert via["keepalive"] == 0
    assert via["alive_after_idle"] == 1
    assert via["after"] == via["before"] == direct["before"]
    assert via["hostname"] == direct["hostname"]
    assert via["domains"] == direct["domains"]
    assert via["close"] >= 0
    # the gateway kept its upstream socket alive through the idle period
    assert ids_before, "gateway held no upstream connection"
    assert set(ids_before) & set(ids_after), (ids_before, ids_after)
