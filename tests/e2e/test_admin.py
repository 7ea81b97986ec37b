"""The admin endpoint (issue "operations", part 1): /healthz, HEAD, /metrics, /status,
the bearer token and the session disconnect action, checked with real clients (http.client,
libvirt-python, virsh) and Prometheus's own text parser."""

import http.client
import socket

import pytest

import harness


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the admin endpoint's unix socket."""

    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def admin_request(gw, method, path, headers=None, body=None, timeout=5.0):
    """One request to the gateway's admin endpoint -> (status, headers dict, body bytes)."""
    admin = gw.config["admin"]
    if "address" in admin:
        host, port = harness.split_address(admin["address"])
        conn = http.client.HTTPConnection(host, port, timeout=harness.scaled(timeout))
    else:
        conn = UnixHTTPConnection(admin["unix"], timeout=harness.scaled(timeout))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def admin_gateway(gateway, lvd, admin=True, **sections):
    cfg = harness.make_config([harness.upstream_entry("hv1", lvd.direct_uri)],
                              default_upstream="hv1", admin=admin, **sections)
    return gateway(cfg)


# --------------------------------------------------------------------------
# /healthz and HEAD
# --------------------------------------------------------------------------

def test_healthz_ok_while_serving(shared_libvirtd, gateway):
    gw = admin_gateway(gateway, shared_libvirtd)
    status, headers, body = admin_request(gw, "GET", "/healthz")
    assert status == 200
    assert body == b"ok\n"
    assert headers["content-type"].startswith("text/plain")
    assert headers["content-length"] == "3"


def test_healthz_on_unix_admin_socket(shared_libvirtd, gateway, tmp_path):
    gw = admin_gateway(gateway, shared_libvirtd, admin={"unix": str(tmp_path / "admin.sock")})
    status, _, body = admin_request(gw, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")


@pytest.mark.parametrize("path", ["/healthz", "/status", "/", "/nosuch"])
def test_head_is_get_without_body(shared_libvirtd, gateway, path):
    gw = admin_gateway(gateway, shared_libvirtd)
    gstatus, gheaders, gbody = admin_request(gw, "GET", path)
    hstatus, hheaders, hbody = admin_request(gw, "HEAD", path)
    assert hstatus == gstatus
    assert hbody == b""
    assert gbody != b""
    for key in ("content-type", "content-length"):
        assert hheaders.get(key) == gheaders.get(key), key
    # /status is made fresh per request; its length may change, the rest may not
    if path != "/status":
        assert int(hheaders["content-length"]) == len(gbody)


def test_unknown_path_404_and_wrong_method_405(shared_libvirtd, gateway):
    gw = admin_gateway(gateway, shared_libvirtd)
    assert admin_request(gw, "GET", "/nosuch")[0] == 404
    assert admin_request(gw, "GET", "/statusx")[0] == 404
    status, headers, _ = admin_request(gw, "POST", "/healthz", body=b"")
    assert status == 405
    assert "GET" in headers["allow"]
    assert admin_request(gw, "DELETE", "/status")[0] == 405


def test_index_lists_endpoints(shared_libvirtd, gateway):
    gw = admin_gateway(gateway, shared_libvirtd)
    status, _, body = admin_request(gw, "GET", "/")
    assert status == 200
    text = body.decode()
    for path in ("/healthz", "/status"):
        assert path in text
