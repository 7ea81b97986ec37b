"""PROXY protocol v2 on TCP listeners ("proxy_protocol": true).

The header a load balancer sends before the client's bytes is read first; the client address
it names is then the peer for policy (source rules), identities, per-source limits, logs and
/status. Hostile or missing headers close the connection with a log line and never disturb
another client; a socket waiting for its header holds an unauthenticated slot. (The real
HAProxy in front of two gateways: test_haproxy.py.)
"""

import re
import socket
import struct
import time

import pytest

import harness
from harness import RawClient, wait_until

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src="192.0.2.7", sport=40000, dst="127.0.0.1", dport=16509, cmd=0x21,
              fam=0x11, tlvs=b""):
    if fam == 0x11:
        addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">HH", sport, dport)
    elif fam == 0x21:
        addrs = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                 + struct.pack(">HH", sport, dport))
    else:
        addrs = b""
    body = addrs + tlvs
    return SIG + bytes([cmd, fam]) + struct.pack(">H", len(body)) + body


class ProxiedClient(RawClient):
    """A raw libvirt client that first writes `header` (as a balancer would)."""

    def __init__(self, port, header, slowly=False, **kw):
        super().__init__(port=port, **kw)
        if slowly:
            self.send_slowly(header)
        else:
            self.send(header)


def proxied_config(lvd, policy=None, limits=None, **listener):
    lst = {"name": "lb", "address": "127.0.0.1:%d" % harness.free_port(), "auth": "none",
           "proxy_protocol": True}
    lst.update(listener)
    cfg = harness.make_config([harness.upstream_entry("hv1", lvd.direct_uri)],
                              default_upstream="hv1", listeners=[lst], limits=limits,
                              admin=True)
    if policy:
        cfg["policy"] = policy
    return cfg


def protocol_errors(gw):
    """virtmux_errors_total{kind="protocol"} from the admin endpoint's /metrics."""
    import http.client
    host, port = harness.split_address(gw.config["admin"]["address"])
    conn = http.client.HTTPConnection(host, port, timeout=harness.scaled(5))
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(r'^virtmux_errors_total\{kind="protocol"\} (\d+)', text, re.M)
    assert m, text[:2000]
    return int(m.group(1))


def closed_by_gateway(sock, timeout=None):
    """True when the gateway closes `sock` (EOF or reset) within `timeout`."""
    sock.settimeout(timeout or harness.scaled(5.0))
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def works(gw, header, slowly=False):
    with ProxiedClient(gw.port, header, slowly=slowly) as c:
        c.handshake()
        return c.list_all_domains()


POLICY = {"default": "deny", "rules": [
    {"match": {"source": "192.0.2.0/24"}, "upstreams": "*"},
    {"match": {"source": "2001:db8::/32"}, "upstreams": "*", "readonly": True},
]}


def test_the_source_in_the_header_is_the_client(shared_libvirtd, gateway):
    gw = gateway(proxied_config(shared_libvirtd, policy=POLICY))
    # the socket's peer is 127.0.0.1, which no rule admits: only the header's source can
    with ProxiedClient(gw.port, v2_header("192.0.2.7", 40000)) as c:
        c.handshake()
        assert c.list_all_domains()
        (sess,) = gw.status()["session_list"]
        assert (sess["peer"], sess["identity"]) == ("192.0.2.7:40000", "192.0.2.7@lb"), sess
    wait_until(lambda: "192.0.2.7:40000" in gw.log_text(), harness.scaled(5))
    log = gw.log_text()
    assert "C#" in log and "192.0.2.7:40000" in log, log[-2000:]
    assert "192.0.2.7@lb" in log
    # IPv6 source, with a TLV after the addresses (skipped), matched by the second rule
    with ProxiedClient(gw.port, v2_header("2001:db8::5", 1234, "::1", 16509, fam=0x21,
                                          tlvs=b"\x02\x00\x04host")) as c:
        c.handshake()
        assert c.list_all_domains()
    assert "[2001:db8::5]:1234" in gw.log_text()
    # a source no rule admits is denied at CONNECT_OPEN, and /status counts it by that source
    with ProxiedClient(gw.port, v2_header("198.51.100.9", 5555)) as c:
        c.auth_list()
        pkt = c.connect_open()
        assert pkt.status == harness.STATUS_ERROR
        assert "access denied" in harness.decode_error(pkt.payload)["message"]
    st = gw.status()
    assert "198.51.100.9@lb" in str(st["denials"]), st["denials"]
    assert "127.0.0.1@lb" not in str(st["denials"]), st["denials"]


def test_local_command_keeps_the_socket_peer(shared_libvirtd, gateway):
    policy = {"default": "deny", "rules": [
        {"match": {"source": "127.0.0.0/8"}, "upstreams": "*"}]}
    gw = gateway(proxied_config(shared_libvirtd, policy=policy))
    assert works(gw, SIG + b"\x20\x00\x00\x00")           # LOCAL: the balancer itself
    assert works(gw, SIG + b"\x21\x00\x00\x00")           # PROXY, UNSPEC family
    # the header byte by byte, then the client right behind it
    with pytest.raises(harness.HarnessError):
        works(gw, v2_header("192.0.2.7"), slowly=True)    # a source the policy denies
    assert works(gw, v2_header("127.0.0.9", 777), slowly=True)
    assert "127.0.0.9:777" in gw.log_text()


HOSTILE = {
    "no-header": (harness.build_packet(harness.REMOTE_PROGRAM, harness.REMOTE_VERSION,
                                       harness.PROC_AUTH_LIST, harness.TYPE_CALL, 0),
                  "no PROXY protocol v2 signature"),
    "tls-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "no PROXY protocol v2 signature"),
    "v1-text": (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 16509\r\n", "only v2 is accepted"),
    "version-1": (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version is not 2"),
    "bad-command": (SIG + b"\x2f\x11\x00\x0c" + bytes(12), "unknown PROXY protocol command"),
    "udp": (SIG + b"\x21\x12\x00\x0c" + bytes(12), "transport is not a stream"),
    "too-long": (SIG + b"\x21\x11\xff\xff", "header too long"),
    "short-addr": (SIG + b"\x21\x21\x00\x0c" + bytes(12), "too short for its address family"),
    "bad-tlv": (v2_header(tlvs=b"\x02\x00\x09ab"), "TLVs run past the header"),
    "signature-garbled": (SIG[:6] + b"X" + SIG[7:] + b"\x21\x11\x00\x00",
                          "no PROXY protocol v2 signature"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_closed_cleanly(shared_libvirtd, gateway, case):
    data, reason = HOSTILE[case]
    gw = gateway(proxied_config(shared_libvirtd))
    assert protocol_errors(gw) == 0
    with RawClient(port=gw.port) as bad, ProxiedClient(gw.port, v2_header()) as good:
        good.handshake()                      # another client, mid-session
        bad.send(data)
        assert closed_by_gateway(bad.sock), "the gateway kept a %s connection" % case
        assert good.list_all_domains()        # and never noticed
    assert wait_until(lambda: reason in gw.log_text(), harness.scaled(5)), gw.log_text()[-2000:]
    assert works(gw, v2_header())
    st = gw.status()
    assert st["unauthenticated"]["clients"] == 0, st["unauthenticated"]
    assert protocol_errors(gw) == 1          # counted as a client breaking the protocol


def test_header_that_never_completes_times_out(shared_libvirtd, gateway):
    gw = gateway(proxied_config(shared_libvirtd, limits={"auth_timeout_s": 1}))
    with RawClient(port=gw.port) as silent, RawClient(port=gw.port) as partial:
        partial.send(v2_header()[:20])        # the fixed part and a little more
        t0 = time.monotonic()
        assert closed_by_gateway(silent.sock, harness.scaled(6))
        assert closed_by_gateway(partial.sock, harness.scaled(6))
        assert time.monotonic() - t0 >= 0.8
    assert "no complete PROXY protocol header in time" in gw.log_text()
    assert works(gw, v2_header())


def test_waiting_for_a_header_takes_an_unauthenticated_slot(shared_libvirtd, gateway):
    gw = gateway(proxied_config(shared_libvirtd, limits={"max_unauthenticated": 2}))
    unauth = lambda: gw.status()["unauthenticated"]["clients"]
    # the harness's readiness probe (connect, close) must be gone first
    assert wait_until(lambda: unauth() == 0, harness.scaled(5))
    silent = []
    try:
        for n in (1, 2):
            silent.append(RawClient(port=gw.port))
            assert wait_until(lambda: unauth() == n, harness.scaled(5))
        with RawClient(port=gw.port) as third:  # a third that would wait: no slot left
            assert closed_by_gateway(third.sock)
        assert "too many unauthenticated clients" in gw.log_text()
        assert gw.status()["unauthenticated"]["refused"] == 1
    finally:
        for c in silent:
            c.close()
    # the slots come back when the silent sockets leave
    assert wait_until(lambda: gw.status()["unauthenticated"]["clients"] == 0,
                      harness.scaled(5)), gw.status()["unauthenticated"]
    assert works(gw, v2_header())


def test_a_burst_behind_one_balancer_is_not_refused(shared_libvirtd, gateway):
    """Before its header every connection comes from the balancer: the per-source share of
    unauthenticated slots must not apply to that address, or a burst of real clients behind
    one balancer would be refused. Each client's share applies to its own source."""
    gw = gateway(proxied_config(shared_libvirtd, limits={"max_unauthenticated": 20,
                                                         "max_unauthenticated_per_source": 1}))
    unauth = lambda: gw.status()["unauthenticated"]["clients"]
    assert wait_until(lambda: unauth() == 0, harness.scaled(5))
    clients = []
    try:
        for _ in range(6):                    # six connections still without their header
            clients.append(RawClient(port=gw.port))
        assert wait_until(lambda: unauth() == 6, harness.scaled(5)), gw.status()
        for i, c in enumerate(clients):      # then each one's header, distinct sources
            c.send(v2_header("192.0.2.%d" % (10 + i), 1000 + i))
        for c in clients:
            c.handshake()
            assert c.list_all_domains()
    finally:
        for c in clients:
            c.close()
    st = gw.status()["unauthenticated"]
    assert st["refused"] == 0 and st["refused_per_source"] == 0, st
    for i in range(6):
        assert "192.0.2.%d:%d" % (10 + i, 1000 + i) in gw.log_text()


def test_proxy_protocol_is_refused_on_unix_listeners(tmp_path):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", "test+tcp://127.0.0.1:1/default")],
        default_upstream="hv1",
        listeners=[{"unix": str(tmp_path / "s.sock"), "proxy_protocol": True}])
    r = harness.check_config(cfg)
    assert r.returncode != 0
    assert "listeners[0].proxy_protocol: only TCP and TLS listeners" in r.stderr + r.stdout


def test_tls_listener_reads_the_header_before_tls(shared_libvirtd, gateway, tmp_path):
    import ssl

    import pki
    ca = pki.Pki(str(tmp_path / "ca"))
    server, client = ca.server("localhost"), ca.client("client1")
    cfg = proxied_config(shared_libvirtd, policy=POLICY, auth="tls",
                         tls={"cert": server.cert, "key": server.key, "ca": ca.ca_cert,
                              "verify_client": "required"})
    gw = gateway(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca.ca_cert)
    ctx.load_cert_chain(client.cert, client.key)
    with ProxiedClient(gw.port, v2_header("192.0.2.44", 4444)) as c:
        c.sock = ctx.wrap_socket(c.sock)      # the ClientHello follows the header
        assert c.sock.recv(1) == b"\x01"      # libvirt's "certificate accepted"
        c.handshake()
        assert c.list_all_domains()
    log = gw.log_text()
    assert re.search(r"C#\d+ 192\.0\.2\.44:4444: authenticated \(tls certificate\)", log), \
        log[-2000:]
    # without a header, the ClientHello itself is the garbage: closed, no TLS
    with RawClient(port=gw.port) as c:
        try:
            c.sock = ctx.wrap_socket(c.sock)
            first = c.sock.recv(1)
        except (ssl.SSLError, OSError):
            first = b""
        assert first == b""
    assert "no PROXY protocol v2 signature" in gw.log_text()


def test_per_source_limits_count_the_real_source(shared_libvirtd, gateway, tmp_path):
    """Clients behind one balancer are limited per their own address: two from one source
    still in the TLS handshake fill its share (1), a third from another source is let in."""
    import pki
    ca = pki.Pki(str(tmp_path / "ca"))
    server = ca.server("localhost")
    gw = gateway(proxied_config(shared_libvirtd, limits={"max_unauthenticated_per_source": 1},
                                tls={"cert": server.cert, "key": server.key,
                                     "ca": ca.ca_cert}))
    unauth = lambda: gw.status()["unauthenticated"]
    assert wait_until(lambda: unauth()["clients"] == 0, harness.scaled(5))
    with ProxiedClient(gw.port, v2_header("192.0.2.50", 1)) as first:
        assert wait_until(lambda: unauth()["clients"] == 1, harness.scaled(5)), unauth()
        with ProxiedClient(gw.port, v2_header("192.0.2.50", 2)) as second:
            assert closed_by_gateway(second.sock)
        with ProxiedClient(gw.port, v2_header("192.0.2.51", 3)) as other:
            assert wait_until(lambda: unauth()["clients"] == 2, harness.scaled(5)), unauth()
            assert not closed_by_gateway(other.sock, 0.3)
            assert unauth()["sources"] == 2
        assert not closed_by_gateway(first.sock, 0.1)
    assert unauth()["refused_per_source"] == 1
    assert "192.0.2.50 already has max_unauthenticated_per_source (1)" in gw.log_text()
