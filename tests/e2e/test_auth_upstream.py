"""The gateway authenticating to libvirtd as itself: an upstream libvirtd with
auth_tcp = "sasl" (the gateway's SASL user), one that wants TLS client
certificates (the gateway's certificate, checked against
tls_allowed_dn_list), and one with TLS + SASL. Clients reach them as
.../hv_sasl/default, .../hv_tls/default and .../hv_tls_sasl/default; libvirtd
sees one client per pool, carrying the gateway's identity. Refusals by
libvirtd reach the clients as "virtmux cannot reach upstream ...".
"""

import os
import shutil
import tempfile

import libvirt
import pytest

import harness
import pki

GW_USER, GW_PASSWORD = "virtmux", "gw-secret"
GW_DN_GLOB = "C=GB,O=Test,CN=virtmux*"


@pytest.fixture(scope="module")
def env(request, prerequisites):
    d = tempfile.mkdtemp(prefix="virtmux-pki-up-")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    ca = pki.Pki(os.path.join(d, "ca"))
    other = pki.Pki(os.path.join(d, "other"), ca_cn="Other CA")
    e = {"dir": d, "ca": ca, "other": other,
         "server": ca.server("localhost"),
         "gwcert": ca.client("virtmux-gw"),
         "intruder": ca.client("intruder"),
         "pw": pki.write_password_file(os.path.join(d, "gw.pw"), GW_PASSWORD),
         "badpw": pki.write_password_file(os.path.join(d, "bad.pw"), "nope")}
    sasl_env = pki.libvirtd_sasl_env(os.path.join(d, "lvd-sasl"),
                                     {GW_USER: GW_PASSWORD})

    def start(name, extra_conf, env=None):
        lvd = harness.Libvirtd(name=name, extra_conf=extra_conf, env=env)
        request.addfinalizer(lvd.cleanup)
        lvd.start()
        return lvd

    e["hv_sasl"] = start("hv_sasl", {"auth_tcp": "sasl"}, sasl_env)
    for name, auth in (("hv_tls", "none"), ("hv_tls_sasl", "sasl")):
        port = harness.free_port()
        conf = ca.libvirtd_tls_conf(e["server"], allowed_dn=[GW_DN_GLOB])
        conf.update({"tls_port": str(port), "auth_tls": auth})
        e[name] = start(name, conf, sasl_env if auth == "sasl" else None)
        e[name + "_port"] = port
    return e


def tls_uri(port):
    return "test+tls://127.0.0.1:%d/default" % port


def entry(env, name, **over):
    """An upstream entry for one of the module's libvirtds; `over` replaces
    tls / sasl pieces to make refused variants."""
    base = name if name in ("hv_sasl", "hv_tls", "hv_tls_sasl") else \
        over.pop("base")
    if base == "hv_sasl":
        e = harness.upstream_entry(name, env["hv_sasl"].direct_uri,
                                   max_connections=1)
    else:
        e = harness.upstream_entry(name, tls_uri(env[base + "_port"]),
                                   max_connections=1)
        e["tls"] = {"ca": env["ca"].ca_cert, "cert": env["gwcert"].cert,
                    "key": env["gwcert"].key}
    if base in ("hv_sasl", "hv_tls_sasl"):
        e["sasl"] = {"username": GW_USER, "password_file": env["pw"]}
    for k, v in over.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


@pytest.fixture(scope="module")
def up_gw(env, module_gateway_factory):
    ups = [entry(env, n) for n in ("hv_sasl", "hv_tls", "hv_tls_sasl")]
    return module_gateway_factory(harness.make_config(
        ups, default_upstream="hv_tls", admin=True))


EXPECT = {
    # upstream: {client-info key: value}, keys that must be absent
    "hv_sasl": ({"sasl_user_name": GW_USER, "transport": "tcp"},
                ["tls_x509_dname"]),
    "hv_tls": ({"tls_x509_dname": "C=GB,O=Test,CN=virtmux-gw",
                "transport": "tls"}, ["sasl_user_name"]),
    "hv_tls_sasl": ({"tls_x509_dname": "C=GB,O=Test,CN=virtmux-gw",
                     "sasl_user_name": GW_USER, "transport": "tls"}, []),
}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_virsh_through_authenticated_upstream(up_gw, name):
    r = harness.virsh(up_gw.uri("%s/default" % name), "list")
    assert r.returncode == 0, r.stderr
    assert "test" in r.stdout and "running" in r.stdout
    r = harness.virsh(up_gw.uri("%s/default" % name), "dominfo", "test")
    assert r.returncode == 0 and "running" in r.stdout, r.stderr


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_libvirtd_sees_the_gateway_identity(env, up_gw, connections, name):
    lvd = env[name]
    conns = []
    for _ in range(8):
        c = harness.call_with_timeout(libvirt.open,
                                      up_gw.uri("%s/default" % name))
        connections.append(c)
        conns.append(c)
        assert [d.name() for d in c.listAllDomains()] == ["test"]
    # max_connections 1: one upstream connection however many clients
    assert lvd.nclients() == 1
    info = lvd.clients()[0]
    want, absent = EXPECT[name]
    for k, v in want.items():
        assert info.get(k) == v, info
    for k in absent:
        assert k not in info, info
    assert "authenticated to libvirtd as SASL user virtmux" in \
        up_gw.log_text() or name == "hv_tls"


def test_sasl_upstream_uses_security_layer_on_tcp(env, up_gw):
    r = harness.virsh(up_gw.uri("hv_sasl/default"), "list")
    assert r.returncode == 0, r.stderr
    log = [l for l in up_gw.log_text().splitlines() if " hv_sasl:" in l]
    assert any("authenticated to libvirtd as SASL user virtmux "
               "(security layer on)" in l for l in log), "\n".join(log)


# --------------------------------------------------------------------------
# refusals by libvirtd, and what the clients are told
# --------------------------------------------------------------------------

REFUSED = {
    "tls_cert_outside_dn_list": (
        dict(base="hv_tls"), "gwcert->intruder",
        "libvirtd refused the gateway's TLS certificate"),
    "tls_wrong_ca": (dict(base="hv_tls"), "ca->other", "cannot reach upstream"),
    "sasl_wrong_password": (
        dict(base="hv_sasl", sasl={"username": GW_USER,
                                   "password_file": "BADPW"}),
        None, "cannot reach upstream"),
    "sasl_not_configured": (dict(base="hv_sasl", sasl=None), None,
                            "libvirtd requires SASL"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_by_libvirtd(env, up_gw, gateway, case):
    over, swap, message = REFUSED[case]
    over = dict(over)
    if "sasl" in over and over["sasl"]:
        over["sasl"] = dict(over["sasl"], password_file=env["badpw"])
    e = entry(env, "bad", **over)
    if swap == "gwcert->intruder":
        e["tls"]["cert"] = env["intruder"].cert
        e["tls"]["key"] = env["intruder"].key
    elif swap == "ca->other":
        e["tls"]["ca"] = env["other"].ca_cert
    good = entry(env, "hv_tls")
    gw = gateway(harness.make_config([e, good], default_upstream="hv_tls"))
    r = harness.virsh(gw.uri("bad/default"), "list")
    with pytest.raises(libvirt.libvirtError) as ei:
        harness.call_with_timeout(libvirt.open, gw.uri("bad/default"))
    err = (ei.value.get_error_code(), str(ei.value))
    assert r.returncode != 0
    # README "Errors clients see": upstream unreachable -> code 1, "internal
    # error: virtmux cannot reach upstream NAME (...)". The client itself did
    # not authenticate (auth none listener): an "authentication failed" of
    # libvirtd's, passed through, would blame the client's credentials.
    assert "internal error: virtmux cannot reach upstream bad" in r.stderr, \
        "virsh: %r; libvirt-python: %r" % (r.stderr, err)
    assert message in r.stderr, r.stderr
    assert err[0] == libvirt.VIR_ERR_INTERNAL_ERROR, err
    # the other upstream of the same gateway is unaffected
    r = harness.virsh(gw.uri("hv_tls/default"), "list")
    assert r.returncode == 0, r.stderr
    assert gw.running()
