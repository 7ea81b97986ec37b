"""Files that hold secrets must not be open to other users.

A TLS private key (listener or upstream), the sasldb, the GSSAPI keytab and
an upstream's SASL password file that other users may read or write
(mode & 0006) make the gateway refuse to start, and --check-config fail,
with an error naming the config path and the file. Group access is fine.
"""

import os
import shutil
import tempfile

import pytest

import harness
import pki


@pytest.fixture(scope="module")
def files():
    d = tempfile.mkdtemp(prefix="virtmux-secrets-")
    ca = pki.Pki(os.path.join(d, "ca"))
    server = ca.server("localhost")
    f = {"dir": d, "ca": ca.ca_cert, "cert": server.cert, "key": server.key,
         "sasldb": pki.make_sasldb(os.path.join(d, "gw.sasldb"),
                                   {"alice": "secret"}),
         "pw": pki.write_password_file(os.path.join(d, "gw.pw"), "pw")}
    f["keytab"] = os.path.join(d, "libvirt.keytab")
    with open(f["keytab"], "wb") as k:
        k.write(b"\x05\x02")   # only its mode matters to the config check
    os.chmod(f["keytab"], 0o600)
    yield f
    shutil.rmtree(d, ignore_errors=True)


def config(f, kind):
    """A config that names the file of `kind`; returns (cfg, path, file)."""
    listeners = [{"name": "tcp", "address": "127.0.0.1:%d" % harness.free_port()}]
    upstream = {"name": "hv1", "uri": "test+tcp://127.0.0.1:1/default"}
    sections = {}
    if kind == "listener_key":
        listeners[0]["tls"] = {"cert": f["cert"], "key": f["key"], "ca": f["ca"]}
        where = ("listeners[0].tls.key", f["key"])
    elif kind == "upstream_key":
        upstream["uri"] = "test+tls://127.0.0.1:1/default"
        upstream["tls"] = {"ca": f["ca"], "cert": f["cert"], "key": f["key"]}
        where = ("upstreams[0].tls.key", f["key"])
    elif kind == "sasldb":
        listeners[0]["auth"] = "sasl"
        sections["sasl"] = {"sasldb": f["sasldb"]}
        where = ("sasl.sasldb", f["sasldb"])
    elif kind == "keytab":
        listeners[0]["auth"] = "sasl"
        sections["sasl"] = {"keytab": f["keytab"], "mechanisms": ["gssapi"]}
        where = ("sasl.keytab", f["keytab"])
    else:
        upstream["sasl"] = {"username": "gw", "password_file": f["pw"]}
        where = ("upstreams[0].sasl.password_file", f["pw"])
    cfg = harness.make_config([upstream], default_upstream="hv1",
                              listeners=listeners, **sections)
    return cfg, where[0], where[1]


KINDS = ["listener_key", "upstream_key", "sasldb", "keytab", "password_file"]


@pytest.mark.parametrize("mode", [0o644, 0o602])
@pytest.mark.parametrize("kind", KINDS)
def test_secret_open_to_others_is_refused(files, virtmux_bin, tmp_path, kind,
                                          mode):
    cfg, path, secret = config(files, kind)
    os.chmod(secret, mode)
    try:
        r = harness.check_config(cfg, binary=virtmux_bin)
        assert r.returncode == 1, (r.stdout, r.stderr)
        expected = '%s: "%s" holds a secret but other users may read or ' \
                   'write it (mode %04o)' % (path, secret, mode)
        assert expected in r.stderr, r.stderr
        # and a real start stops before binding anything
        gw = harness.Virtmux(cfg, binary=virtmux_bin)
        try:
            with pytest.raises(harness.HarnessError) as e:
                gw.start()
            assert "exited with 1" in str(e.value)
            assert expected in gw.log_text()
            assert "listening on" not in gw.log_text()
        finally:
            gw.cleanup()
    finally:
        os.chmod(secret, 0o600)


@pytest.mark.parametrize("kind", KINDS)
def test_secret_readable_by_group_is_accepted(files, virtmux_bin, kind):
    cfg, _path, secret = config(files, kind)
    os.chmod(secret, 0o640)
    try:
        r = harness.check_config(cfg, binary=virtmux_bin)
        assert r.returncode == 0, r.stderr
    finally:
        os.chmod(secret, 0o600)


def test_sasl_listener_starts_with_a_private_sasldb(files, gateway,
                                                     shared_libvirtd):
    """The fixtures' files (0600) pass: the gateway runs and logs in a user."""
    cfg, _path, _secret = config(files, "sasldb")
    cfg["upstreams"][0]["uri"] = shared_libvirtd.direct_uri
    cfg["sasl"]["mechanisms"] = ["digest-md5"]
    authfile = pki.write_authfile(os.path.join(files["dir"], "alice.auth"),
                                  "alice", "secret")
    gw = gateway(cfg)
    r = harness.virsh("test+tcp://127.0.0.1:%d/default?authfile=%s"
                      % (gw.port, authfile), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
