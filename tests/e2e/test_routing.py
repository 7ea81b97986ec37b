"""Routing at CONNECT_OPEN: the first path segment picks the upstream."""

import os
import tempfile

import libvirt
import pytest

import harness
from harness import call_with_timeout, virsh

DOMAIN_XML = ("<domain type='test'><name>%s</name><memory>65536</memory>"
              "<os><type>hvm</type></os></domain>")


@pytest.fixture
def keepers(two_libvirtd):
    """Direct connections that keep each test driver's state alive (it is
    dropped when the last connection to test:///default closes)."""
    conns = [libvirt.open(lvd.direct_uri) for lvd in two_libvirtd]
    yield conns
    for c in conns:
        try:
            c.close()
        except libvirt.libvirtError:
            pass


@pytest.fixture
def routed(two_libvirtd, keepers, gateway):
    hv1, hv2 = two_libvirtd
    gwsock = os.path.join(tempfile.mkdtemp(prefix="virtmux-sock-"), "sock")
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", hv1.direct_uri, max_connections=2),
         # hv2 is reached over its UNIX socket
         harness.upstream_entry("hv2", hv2.unix_uri, max_connections=2)],
        default_upstream="hv1",
        listeners=[
            {"name": "tcp", "address": "127.0.0.1:%d" % harness.free_port(),
             "auth": "none"},
            {"name": "local", "unix": gwsock, "mode": "0666", "auth": "none",
             "upstream": "hv2"},
        ])
    gw = gateway(cfg)
    yield hv1, hv2, gw
    gw.stop()
    try:
        os.unlink(gwsock)
    except OSError:
        pass
    os.rmdir(os.path.dirname(gwsock))


def names(uri):
    r = virsh(uri, "list", "--all", "--name")
    assert r.returncode == 0, (uri, r.stderr)
    return sorted(n for n in r.stdout.split() if n)


def test_route_by_path_segment(routed):
    hv1, hv2, gw = routed
    conn = call_with_timeout(libvirt.open, gw.uri("hv2/default"))
    try:
        dom = conn.defineXML(DOMAIN_XML % "only-on-hv2")
        try:
            assert names(gw.uri("hv2/default")) == ["only-on-hv2", "test"]
            assert names(hv2.direct_uri) == ["only-on-hv2", "test"]
            assert names(gw.uri("hv1/default")) == ["test"]
            assert names(gw.uri("default")) == ["test"]      # default route
            assert names(hv1.direct_uri) == ["test"]
            # the UNIX listener is pinned to hv2
            assert names(gw.unix_uri(0)) == ["only-on-hv2", "test"]
        finally:
            dom.undefine()
        assert names(hv2.direct_uri) == ["test"]
    finally:
        conn.close()


def test_define_on_hv1_not_on_hv2(routed):
    hv1, hv2, gw = routed
    conn = call_with_timeout(libvirt.open, gw.uri("default"))
    try:
        dom = conn.defineXML(DOMAIN_XML % "on-hv1")
        try:
            assert names(gw.uri("hv1/default")) == ["on-hv1", "test"]
            assert names(hv1.direct_uri) == ["on-hv1", "test"]
            assert names(gw.uri("hv2/default")) == ["test"]
            assert names(hv2.direct_uri) == ["test"]
        finally:
            dom.undefine()
    finally:
        conn.close()


@pytest.fixture
def no_default(two_libvirtd, gateway):
    hv1, hv2 = two_libvirtd
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", hv1.direct_uri),
         harness.upstream_entry("hv2", hv2.unix_uri)])
    return hv1, hv2, gateway(cfg)


def test_unroutable_without_default(no_default):
    hv1, hv2, gw = no_default
    r = virsh(gw.uri("nosuch/default"), "list")
    assert r.returncode == 1
    assert "nosuch" in r.stderr, r.stderr

    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(libvirt.open, gw.uri("nosuch/default"))
    assert ei.value.get_error_code() == harness.VIR_ERR_NO_CONNECT
    assert "nosuch" in str(ei.value)

    # named routes still work on the same gateway
    assert names(gw.uri("hv1/default")) == ["test"]
    assert names(gw.uri("hv2/default")) == ["test"]


def test_default_path_without_default_upstream(no_default):
    _, _, gw = no_default
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(libvirt.open, gw.uri("default"))
    assert ei.value.get_error_code() == harness.VIR_ERR_NO_CONNECT


def test_raw_open_unroutable(no_default):
    _, _, gw = no_default
    with harness.RawClient(port=gw.port) as c:
        assert c.auth_list() == [0]
        pkt = c.connect_open("test:///nosuch/default")
        assert pkt.status == harness.STATUS_ERROR
        err = harness.decode_error(pkt.payload)
        assert err["code"] == harness.VIR_ERR_NO_CONNECT
        assert "nosuch" in (err["message"] or "")


def test_gateway_behind_gateway(two_libvirtd, keepers, gateway):
    """A virtmux can be the upstream of another virtmux."""
    hv1, _ = two_libvirtd
    inner = gateway.single(hv1.direct_uri)
    outer = gateway.single("test+tcp://127.0.0.1:%d/default" % inner.port,
                           name="inner")
    for args in (["list", "--all"], ["net-list", "--all"],
                 ["capabilities"]):
        via = virsh(outer.uri(), *args)
        direct = virsh(hv1.direct_uri, *args)
        assert via.returncode == 0, via.stderr
        assert via.stdout == direct.stdout
    conn = call_with_timeout(libvirt.open, outer.uri())
    try:
        dom = conn.defineXML(DOMAIN_XML % "two-hops")
        try:
            assert names(hv1.direct_uri) == ["test", "two-hops"]
        finally:
            dom.undefine()
    finally:
        conn.close()
