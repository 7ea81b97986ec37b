"""Clients that have not authenticated are bounded in number and in time.

limits.max_unauthenticated (like libvirtd's max_anonymous_clients) caps the
connections still authenticating, limits.max_unauthenticated_per_source the
share of one source (TCP address, unix uid) so that one source cannot take
every slot; limits.auth_timeout_s closes one that never finishes. None may
disturb authenticated clients."""

import os
import socket
import time

import pytest

import harness
import pki
from harness import virsh, wait_until


def connect_from(source, port):
    """An idle TCP connection to the gateway from loopback address `source`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(sock, timeout=0.2):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def setup(shared_libvirtd, gateway, tmp_path):
    db = pki.make_sasldb(str(tmp_path / "sasldb"), {"alice": "secret"})
    authfile = pki.write_authfile(str(tmp_path / "auth"), "alice", "secret")
    sasl_port, plain_port = harness.free_port(), harness.free_port()
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
        default_upstream="hv1",
        listeners=[{"name": "sasl", "address": "127.0.0.1:%d" % sasl_port,
                    "auth": "sasl"},
                   {"name": "plain", "address": "127.0.0.1:%d" % plain_port}],
        limits={"max_unauthenticated": 3, "auth_timeout_s": 2},
        sasl={"sasldb": db, "mechanisms": ["digest-md5"]}, admin=True)
    gw = gateway(cfg)
    # the harness' readiness probes are sessions too, briefly: let them go so
    # that every unauthenticated slot is free when the test starts
    assert wait_until(lambda: gw.status()["sessions"] == 0, 10.0)
    return gw, sasl_port, plain_port, authfile


def test_unauthenticated_clients_are_capped_and_timed_out(setup):
    gw, sasl_port, plain_port, authfile = setup
    opened = time.monotonic()
    # five sources, so that the gateway-wide cap is what refuses
    idle = [connect_from("127.0.0.%d" % (10 + i), sasl_port)
            for i in range(5)]
    try:
        # the first three hold the slots, the other two are closed at once
        # (well before auth_timeout_s)
        assert wait_until(lambda: sum(closed_by_peer(s, 0.02) for s in idle) >= 2,
                          1.5)
        state = [closed_by_peer(s, 0.02) for s in idle]
        assert state == [False, False, False, True, True], state
        assert "max_unauthenticated (3)" in gw.log_text()
        # while the slots are full, an authenticated-by-listener client (auth
        # none) is unaffected
        out = virsh("test+tcp://127.0.0.1:%d/default" % plain_port, "list")
        assert out.returncode == 0 and "test" in out.stdout, out
        # the three idle ones are closed by auth_timeout_s (2 s)
        assert wait_until(lambda: all(closed_by_peer(s, 0.05) for s in idle[:3]),
                          5.0)
        assert time.monotonic() - opened < 2 + 3.0  # auth_timeout_s + slack
        assert "authentication timed out" in gw.log_text()
        # slots are free again: a SASL client gets in
        uri = "test+tcp://127.0.0.1:%d/default?authfile=%s" % (sasl_port,
                                                                authfile)
        out = virsh(uri, "list")
        assert out.returncode == 0 and "test" in out.stdout, out
    finally:
        for s in idle:
            s.close()


def test_authenticated_session_is_not_timed_out(setup):
    gw, sasl_port, plain_port, authfile = setup
    import libvirt
    conn = libvirt.openAuth(
        "test+tcp://127.0.0.1:%d/default" % sasl_port,
        pki.auth_callback("alice", "secret"), 0)
    try:
        time.sleep(3.0)  # longer than auth_timeout_s
        assert conn.lookupByName("test").info()[0] == 1
    finally:
        conn.close()


def test_one_source_cannot_take_every_slot(shared_libvirtd, gateway, tmp_path):
    """With the default limits (20 overall, 5 per source) 25 idle sockets
    from 127.0.0.2 hold five slots; the other 20 are closed at once, and a
    client from 127.0.0.1 still authenticates and works."""
    db = pki.make_sasldb(str(tmp_path / "sasldb"), {"alice": "secret"})
    authfile = pki.write_authfile(str(tmp_path / "auth"), "alice", "secret")
    port = harness.free_port()
    gw = gateway(harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
        default_upstream="hv1",
        listeners=[{"name": "sasl", "address": "127.0.0.1:%d" % port,
                    "auth": "sasl"}],
        sasl={"sasldb": db, "mechanisms": ["digest-md5"]}, admin=True))
    assert wait_until(lambda: gw.status()["sessions"] == 0, 10.0)
    idle = [connect_from("127.0.0.2", port) for _ in range(25)]
    try:
        assert wait_until(
            lambda: sum(closed_by_peer(s, 0.02) for s in idle) >= 20, 3.0)
        state = [closed_by_peer(s, 0.02) for s in idle]
        assert state == [False] * 5 + [True] * 20, state
        assert "refused: 127.0.0.2 already has max_unauthenticated_per_source" \
               " (5) clients authenticating" in gw.log_text()
        unauth = gw.status()["unauthenticated"]
        assert unauth["clients"] == 5 and unauth["sources"] == 1, unauth
        assert unauth["refused_per_source"] == 20, unauth
        uri = "test+tcp://127.0.0.1:%d/default?authfile=%s" % (port, authfile)
        r = virsh(uri, "list", "--name")
        assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
    finally:
        for s in idle:
            s.close()
    # the offender's slots come back when it leaves, and its entry goes
    assert wait_until(lambda: gw.status()["unauthenticated"]["sources"] == 0,
                      5.0), gw.status()["unauthenticated"]
    assert gw.status()["unauthenticated"]["clients"] == 0
