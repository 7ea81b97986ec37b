"""TLS listeners with client certificates as the authentication
(``auth: "tls"``): virsh and libvirt-python with a good certificate, the
refusals (DN outside ``allowed_dn``, expired, signed by another CA) while a
good client keeps working, the denial counters, and certificate reload on
SIGHUP.

libvirt's TLS handshake: after the TLS handshake the server checks the client
certificate and writes one byte 0x01; a refused client is closed without it
(virsh: "failed to connect to the hypervisor").
"""

import os
import shutil
import signal
import tempfile
import threading
import time

import libvirt
import pytest

import harness
import pki

ALLOWED = "C=GB,O=Test,CN=client*"


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(request):
    d = tempfile.mkdtemp(prefix="virtmux-pki-tls-")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    ca = pki.Pki(os.path.join(d, "ca"))
    other = pki.Pki(os.path.join(d, "other"), ca_cn="Other CA")
    c = {
        "dir": d,
        "ca": ca,
        "other": other,
        "server": ca.server("localhost"),
        "server2": ca.server("localhost", name="server-next"),
        "client1": ca.client("client1"),
        "client2": ca.client("client2"),
        "mallory": ca.client("mallory"),              # CN outside client*
        "expired": ca.client("client9", expired=True),  # DN allowed, expired
        "foreign": other.client("client1"),           # DN allowed, other CA
    }
    c["dir_client1"] = ca.client_dir(c["client1"])
    c["dir_client2"] = ca.client_dir(c["client2"])
    c["dir_mallory"] = ca.client_dir(c["mallory"])
    c["dir_expired"] = ca.client_dir(c["expired"])
    # The libvirt client checks its own certificate against its cacert.pem
    # before connecting; with both CAs in that file the foreign certificate
    # passes the client's own check and only the gateway can refuse it.
    both = os.path.join(d, "both-cas.pem")
    with open(both, "w") as f:
        f.write(open(ca.ca_cert).read() + open(other.ca_cert).read())
    c["dir_foreign"] = other.client_dir(
        c["foreign"], directory=os.path.join(d, "pki-foreign"), cacert=both)
    return c


def tls_listener(certs, port, name="tls", server=None, allowed=(ALLOWED,)):
    srv = server or certs["server"]
    return {"name": name, "address": "127.0.0.1:%d" % port, "auth": "tls",
            "tls": {"cert": srv.cert, "key": srv.key,
                    "ca": certs["ca"].ca_cert,
                    "verify_client": "required",
                    "allowed_dn": list(allowed)}}


@pytest.fixture(scope="module")
def tls_gw(request, certs, shared_libvirtd, module_gateway_factory):
    port = harness.free_port()
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
        default_upstream="hv1", listeners=[tls_listener(certs, port)],
        admin=True)
    return module_gateway_factory(cfg)


def tls_uri(port, pkidir, path="default"):
    return "test+tls://127.0.0.1:%d/%s?pkipath=%s" % (port, path, pkidir)


def tls_denials(gw):
    """Sum of the /status denial counters for the TLS step."""
    return sum(d["count"] for d in gw.status()["denials"]
               if d["procedure"] == "TLS")


class Pinger:
    """A good libvirt-python client that keeps calling in a thread while
    something else happens; every call must succeed."""

    def __init__(self, conn):
        self.conn = conn
        self.calls = 0
        self.errors = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                names = [d.name() for d in self.conn.listAllDomains()]
                if names != ["test"]:
                    self.errors.append("unexpected domains %r" % names)
                self.calls += 1
            except libvirt.libvirtError as e:
                self.errors.append(str(e))
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)
        assert not self._t.is_alive(), "the good client's call hung"


# --------------------------------------------------------------------------
# good certificates
# --------------------------------------------------------------------------

def test_virsh_with_client_certificate(tls_gw, certs):
    r = harness.virsh(tls_uri(tls_gw.port, certs["dir_client1"]), "list")
    assert r.returncode == 0, r.stderr
    assert "test" in r.stdout and "running" in r.stdout
    assert harness.wait_until(
        lambda: "authenticated (tls certificate) as C=GB,O=Test,CN=client1@tls"
        in tls_gw.log_text(), 5.0), tls_gw.log_tail(30)


def test_python_with_client_certificate(tls_gw, certs, connections):
    conn = harness.call_with_timeout(
        libvirt.open, tls_uri(tls_gw.port, certs["dir_client2"]), timeout=30)
    connections.append(conn)
    assert [d.name() for d in conn.listAllDomains()] == ["test"]
    state, maxmem, _mem, ncpu, _t = conn.lookupByName("test").info()
    assert state == libvirt.VIR_DOMAIN_RUNNING and ncpu >= 1
    assert harness.wait_until(
        lambda: "as C=GB,O=Test,CN=client2@tls" in tls_gw.log_text(), 5.0)


def test_gateway_sends_confirmation_byte_only_after_the_check(tls_gw, certs):
    """Raw TLS: the accepted certificate gets 0x01, a refused one gets the
    connection closed instead (libvirt's protocol)."""
    serial, first = pki.peer_certificate(tls_gw.port, client=certs["client1"],
                                         cafile=certs["ca"].ca_cert)
    assert serial == certs["server"].serial
    assert first == b"\x01"
    _, first = pki.peer_certificate(tls_gw.port, client=certs["mallory"],
                                    cafile=certs["ca"].ca_cert)
    assert first == b""
    # no certificate at all: required, so refused
    _, first = pki.peer_certificate(tls_gw.port, cafile=certs["ca"].ca_cert)
    assert first == b""


# --------------------------------------------------------------------------
# refused certificates
# --------------------------------------------------------------------------

REFUSALS = {
    # case: (pki dir key, cert key, gateway log reason)
    "dn_outside_allowlist": ("dir_mallory", "mallory",
                             'client certificate DN "C=GB,O=Test,CN=mallory" '
                             'is not in allowed_dn'),
    "expired": ("dir_expired", "expired", "certificate has expired"),
    "other_ca": ("dir_foreign", "foreign", "unable to verify"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_certificate(tls_gw, certs, connections, case):
    pkidir, certname, reason = REFUSALS[case]
    good = harness.call_with_timeout(
        libvirt.open, tls_uri(tls_gw.port, certs["dir_client1"]), timeout=30)
    connections.append(good)
    before = tls_denials(tls_gw)
    with Pinger(good) as pinger:
        # virsh with the refused certificate
        r = harness.virsh(tls_uri(tls_gw.port, certs[pkidir]), "list")
        assert r.returncode != 0
        assert "failed to connect to the hypervisor" in r.stderr, r.stderr
        # libvirt-python too
        with pytest.raises(libvirt.libvirtError):
            harness.call_with_timeout(
                libvirt.open, tls_uri(tls_gw.port, certs[pkidir]), timeout=30)
        # the gateway's own verdict, whatever the client library checked
        # first (libvirt refuses to send an expired certificate of its own)
        _, first = pki.peer_certificate(tls_gw.port, client=certs[certname])
        assert first == b"", "the gateway confirmed a %s certificate" % case
        time.sleep(0.2)
    assert pinger.errors == [], pinger.errors
    assert pinger.calls > 0
    # the good session still works, and a new good client gets in
    assert [d.name() for d in good.listAllDomains()] == ["test"]
    r = harness.virsh(tls_uri(tls_gw.port, certs["dir_client2"]), "list")
    assert r.returncode == 0, r.stderr
    # counted and logged
    assert harness.wait_until(lambda: tls_denials(tls_gw) > before, 5.0)
    assert reason in tls_gw.log_text(), tls_gw.log_tail(20)
    assert tls_gw.running()


def test_refusals_in_status(tls_gw, certs):
    before = tls_denials(tls_gw)
    for name in ("mallory", "expired", "foreign"):
        _, first = pki.peer_certificate(tls_gw.port, client=certs[name])
        assert first == b""
    assert harness.wait_until(lambda: tls_denials(tls_gw) >= before + 3, 5.0)
    st = tls_gw.status()
    tls = [d for d in st["denials"] if d["procedure"] == "TLS"]
    assert tls and all(d["identity"] == "127.0.0.1@tls" for d in tls), tls
    assert st["denials_total"] >= before + 3


# --------------------------------------------------------------------------
# certificate reload
# --------------------------------------------------------------------------

def test_sighup_reloads_server_certificate(certs, libvirtd, gateway,
                                           connections, tmp_path):
    cert = str(tmp_path / "servercert.pem")
    key = str(tmp_path / "serverkey.pem")
    pki.replace_files(certs["server"], cert, key)
    srv = pki.Cert("live", cert, key, certs["server"].serial,
                   certs["server"].dn, certs["ca"])
    port = harness.free_port()
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri)],
        default_upstream="hv1",
        listeners=[tls_listener(certs, port, server=srv)])
    gw = gateway(cfg)
    ca = certs["ca"].ca_cert

    serial, first = pki.peer_certificate(port, client=certs["client1"],
                                         cafile=ca)
    assert (serial, first) == (certs["server"].serial, b"\x01")
    old = harness.call_with_timeout(
        libvirt.open, tls_uri(port, certs["dir_client1"]), timeout=30)
    connections.append(old)
    assert [d.name() for d in old.listAllDomains()] == ["test"]

    new = certs["server2"]
    assert new.serial != certs["server"].serial
    pki.replace_files(new, cert, key)
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert harness.wait_until(
        lambda: "TLS certificates reloaded" in gw.log_text(), 5.0), \
        gw.log_tail(20)

    serial, first = pki.peer_certificate(port, client=certs["client1"],
                                         cafile=ca)
    assert serial == new.serial, "new connections still get the old cert"
    assert first == b"\x01"
    r = harness.virsh(tls_uri(port, certs["dir_client2"]), "list")
    assert r.returncode == 0, r.stderr
    # the session made before the reload carries on
    assert [d.name() for d in old.listAllDomains()] == ["test"]
    assert old.lookupByName("test").info()[0] == libvirt.VIR_DOMAIN_RUNNING

    # a broken replacement is refused and the last good one stays in use
    with open(cert, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                "-----END CERTIFICATE-----\n")
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert harness.wait_until(
        lambda: "TLS reload failed, keeping the old certificates"
        in gw.log_text(), 5.0), gw.log_tail(20)
    serial, first = pki.peer_certificate(port, client=certs["client1"],
                                         cafile=ca)
    assert (serial, first) == (new.serial, b"\x01")
    assert [d.name() for d in old.listAllDomains()] == ["test"]
    assert gw.running()


# --------------------------------------------------------------------------
# policy on the certificate DN
# --------------------------------------------------------------------------

def test_policy_readonly_by_tls_dn(certs, libvirtd, gateway, connections):
    port = harness.free_port()
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri)],
        default_upstream="hv1", listeners=[tls_listener(certs, port)],
        policy={"default": "allow",
                "rules": [{"match": {"tls_dn": "*,CN=client2"},
                           "readonly": True}]})
    gateway(cfg)
    ro = harness.call_with_timeout(
        libvirt.open, tls_uri(port, certs["dir_client2"]), timeout=30)
    connections.append(ro)
    with pytest.raises(libvirt.libvirtError) as ei:
        ro.lookupByName("test").destroy()
    assert ei.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    assert "operation forbidden" in str(ei.value)
    rw = harness.call_with_timeout(
        libvirt.open, tls_uri(port, certs["dir_client1"]), timeout=30)
    connections.append(rw)
    dom = rw.lookupByName("test")
    dom.destroy()
    assert dom.info()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    dom.create()
    assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_auth_tls_forces_a_verified_certificate(certs, shared_libvirtd,
                                                gateway):
    """auth "tls" makes the certificate required even when the tls object
    says optional; an auth "none" TLS listener with verify_client optional
    serves clients without a certificate (encryption only)."""
    p_tls, p_none = harness.free_port(), harness.free_port()
    forced = tls_listener(certs, p_tls, name="forced", allowed=("*",))
    forced["tls"]["verify_client"] = "optional"
    plain = tls_listener(certs, p_none, name="enc", allowed=("*",))
    plain["auth"] = "none"
    plain["tls"]["verify_client"] = "optional"
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
        default_upstream="hv1", listeners=[forced, plain])
    gw = gateway(cfg)
    ca = certs["ca"].ca_cert
    assert pki.peer_certificate(p_tls, cafile=ca)[1] == b""
    assert pki.peer_certificate(p_tls, client=certs["client1"],
                                cafile=ca)[1] == b"\x01"
    assert pki.peer_certificate(p_none, cafile=ca)[1] == b"\x01"
    # optional still means "verified if presented"
    assert pki.peer_certificate(p_none, client=certs["foreign"],
                                cafile=ca)[1] == b""
    r = harness.virsh(tls_uri(p_none, certs["dir_client1"]), "list")
    assert r.returncode == 0, r.stderr
    assert "no client certificate" in gw.log_text()
