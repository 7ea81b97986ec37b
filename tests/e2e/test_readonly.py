"""Read-only clients ride their own pool of read-only upstream sockets."""

import threading

import libvirt
import pytest

import harness
from harness import RawClient, call_with_timeout, virsh, wait_until


@pytest.fixture
def gw(libvirtd, gateway):
    return gateway.single(libvirtd.direct_uri,
                          pool={"max_connections": 2, "max_inflight": 4,
                                "idle_timeout_s": 60})


def _readonly_flags(lvd):
    return sorted(c.get("readonly") for c in lvd.clients())


def test_separate_readonly_pool(libvirtd, gw):
    lvd = libvirtd
    rw = [call_with_timeout(libvirt.open, gw.uri()) for _ in range(6)]
    ro = [call_with_timeout(libvirt.openReadOnly, gw.uri()) for _ in range(6)]
    errors = []

    def work(conn):
        try:
            dom = conn.lookupByName("test")
            for _ in range(20):
                dom.info()
        except Exception as e:
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=work, args=(c,), daemon=True)
                   for c in rw + ro]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors

        clients = lvd.clients()
        flags = [c.get("readonly") for c in clients]
        assert 1 <= flags.count("yes") <= 2, clients
        assert 1 <= flags.count("no") <= 2, clients
        assert len(flags) <= 4

        # the read-only connections really are read-only end to end
        with pytest.raises(libvirt.libvirtError):
            ro[0].lookupByName("test").destroy()
        assert rw[0].lookupByName("test").info()[0] == \
            libvirt.VIR_DOMAIN_RUNNING
    finally:
        for c in rw + ro:
            c.close()


def test_raw_readonly_destroy_is_refused(libvirtd, gw):
    """libvirt clients refuse writes locally, so test with raw packets: a
    read-only session must not be able to destroy a domain even if it sends
    the call."""
    keeper = libvirt.open(libvirtd.direct_uri)
    try:
        with RawClient(port=gw.port) as c:
            c.handshake(readonly=True)
            dom = c.lookup_domain("test")
            payload = harness.xdr_domain(dom["name"], dom["uuid"],
                                         dom["id"])
            pkt = c.call(harness.PROC_DOMAIN_DESTROY, payload)
            assert pkt.status == harness.STATUS_ERROR
            err = harness.decode_error(pkt.payload)
            assert err["code"] in (harness.VIR_ERR_OPERATION_DENIED, 88), err
        assert keeper.lookupByName("test").info()[0] == \
            libvirt.VIR_DOMAIN_RUNNING
        # the read-only upstream socket is marked read-only in libvirtd
        assert wait_until(lambda: "yes" in _readonly_flags(libvirtd), 3.0)
    finally:
        keeper.close()


def test_virsh_readonly_listing(libvirtd, gw):
    via = virsh(gw.uri(), "list", "--all", readonly=True)
    direct = virsh(libvirtd.direct_uri, "list", "--all", readonly=True)
    assert via.returncode == 0, via.stderr
    assert via.stdout == direct.stdout
