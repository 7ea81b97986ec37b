"""Pool limits: in-flight cap per upstream socket, idle close, reconnect."""

import os
import stat
import tempfile
import threading
import time

import libvirt

import harness
from harness import call_with_timeout, start_call, virsh, wait_until


def open_doms(gw, n):
    conns = [call_with_timeout(libvirt.open, gw.uri(), timeout=10)
             for _ in range(n)]
    return conns, [c.lookupByName("test") for c in conns]


def test_max_inflight_per_connection(libvirtd, gateway):
    """One upstream socket taking two calls at a time: with libvirtd frozen,
    two calls go out and hang, the third waits in the queue and times out."""
    gw = gateway.single(
        libvirtd.direct_uri,
        # coalesce off: identical calls would share one slot instead of filling them
        pool={"max_connections": 1, "max_inflight": 2, "idle_timeout_s": 60,
              "coalesce": False},
        limits={"queue_timeout_ms": 500})
    conns, doms = open_doms(gw, 3)
    try:
        expected = [d.info()[:4] for d in doms][0]
        libvirtd.sigstop()
        try:
            t1, r1 = start_call(doms[0].info)
            t2, r2 = start_call(doms[1].info)
            time.sleep(0.3)
            t3, r3 = start_call(doms[2].info)
            t3.join(5)
            assert not t3.is_alive()
            assert isinstance(r3.error, libvirt.libvirtError), r3.value
            assert r3.error.get_error_code() == \
                harness.VIR_ERR_OPERATION_TIMEOUT
            # the two in flight are not subject to the queue timeout
            assert t1.is_alive() and t2.is_alive()
        finally:
            libvirtd.sigcont()
        t1.join(10)
        t2.join(10)
        assert r1.error is None and r1.value[:4] == expected, r1.error
        assert r2.error is None and r2.value[:4] == expected, r2.error
        assert libvirtd.nclients() == 1
    finally:
        for c in conns:
            c.close()


def test_idle_upstream_closed_and_reopened(libvirtd, gateway):
    gw = gateway.single(libvirtd.direct_uri,
                        pool={"max_connections": 2, "max_inflight": 4,
                              "idle_timeout_s": 1})
    r = virsh(gw.uri(), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
    # nobody uses the upstream socket any more: it goes after ~1 s
    assert wait_until(lambda: libvirtd.nclients() == 0, 5.0), \
        libvirtd.clients()
    # and comes back on demand
    r = virsh(gw.uri(), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr


def test_unix_listener_mode(libvirtd, gateway):
    """Unix listeners default to 0660 (not every local user is a client);
    an explicit mode is honoured."""
    d = tempfile.mkdtemp(prefix="virtmux-sock-")
    default_path = os.path.join(d, "gw-default")
    strict_path = os.path.join(d, "gw-strict")
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri)],
        listeners=[{"name": "default", "unix": default_path,
                    "auth": "none", "upstream": "hv1"},
                   {"name": "strict", "unix": strict_path, "mode": "0600",
                    "auth": "none", "upstream": "hv1"}])
    try:
        gw = gateway(cfg)
        assert stat.S_IMODE(os.stat(default_path).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(strict_path).st_mode) == 0o600
        for i in (0, 1):
            r = virsh(gw.unix_uri(i), "list", "--name")
            assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
        gw.stop()
    finally:
        for p in (default_path, strict_path):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(d)


def test_max_clients(libvirtd, gateway):
    """Beyond max_clients a new client is refused or waits (as libvirtd
    lets it wait in the listen backlog); it never breaks the others, and
    once a slot is free a new client gets in."""
    gw = gateway.single(libvirtd.direct_uri, limits={"max_clients": 2})
    c1 = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    c2 = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    t3, r3 = start_call(libvirt.open, gw.uri())
    t3.join(1.0)
    c3 = None
    try:
        waited = t3.is_alive()
        if not waited:
            assert isinstance(r3.error, libvirt.libvirtError), r3.value
        for c in (c1, c2):
            assert c.lookupByName("test").info()[0] == 1
        c1.close()
        c1 = None
        if waited:
            t3.join(10)
            assert not t3.is_alive(), "waiting client never admitted"
            assert r3.error is None, r3.error
            c3 = r3.value
        else:
            c3 = wait_until(lambda: _try_open(gw.uri()), 5.0)
            assert c3, "no client admitted after a slot was freed"
        assert c3.lookupByName("test").info()[0] == 1
    finally:
        for c in (c1, c2, c3):
            if c is not None:
                c.close()
        t3.join(5)
        if r3.value is not None and r3.value is not c3:
            r3.value.close()


def _try_open(uri):
    try:
        return call_with_timeout(libvirt.open, uri, timeout=3)
    except (libvirt.libvirtError, AssertionError):
        return None


def test_upstream_reads_fewer_requests_than_max_inflight(libvirtd_factory,
                                                         gateway):
    """libvirtd configured to read only 2 requests per client while the
    gateway allows 4 in flight: libvirtd applies back-pressure (stops
    reading) and everything still completes."""
    lvd = libvirtd_factory(max_client_requests=2)
    gw = gateway.single(lvd.direct_uri,
                        pool={"max_connections": 1, "max_inflight": 4})
    errors = []
    done = [0]
    lock = threading.Lock()

    def worker():
        try:
            conn = libvirt.open(gw.uri())
            try:
                dom = conn.lookupByName("test")
                for _ in range(50):
                    assert dom.info()[0] == 1
                    with lock:
                        done[0] += 1
            finally:
                conn.close()
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "calls hung"
    assert not errors, errors[:5]
    assert done[0] == 20 * 50
    assert lvd.nclients() == 1
