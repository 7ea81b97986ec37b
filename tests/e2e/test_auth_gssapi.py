"""SASL GSSAPI (Kerberos) at the gateway, against a private KDC.

The fixture builds a throw-away realm in a temp dir (krb5kdc on a loopback
port, its own krb5.conf via KRB5_CONFIG), a keytab for libvirt/localhost and a
user principal; virsh gets a ticket with kinit and logs in to a SASL listener
offering only GSSAPI, over plain TCP, so the security layer is on."""

import os
import shutil
import signal
import subprocess
import time

import pytest

import harness
from harness import virsh, wait_until

REALM = "VIRTMUX.TEST"


def run(argv, env, input_text=None):
    p = subprocess.run(argv, env=env, input=input_text, capture_output=True,
                       text=True, timeout=30)
    if p.returncode != 0:
        raise AssertionError("%s failed: %s %s" % (argv, p.stdout, p.stderr))
    return p


@pytest.fixture
def kdc(tmp_path):
    for tool in ("krb5kdc", "kdb5_util", "kadmin.local", "kinit"):
        assert shutil.which(tool) or os.path.exists("/usr/sbin/" + tool), (
            "%s missing: scripts/deps.sh installs krb5-kdc, krb5-admin-server "
            "and krb5-user" % tool)
    d = str(tmp_path)
    port = harness.free_port()
    with open(os.path.join(d, "krb5.conf"), "w") as f:
        f.write("[libdefaults]\n default_realm = %s\n dns_lookup_kdc = false\n"
                " dns_lookup_realm = false\n rdns = false\n"
                " dns_canonicalize_hostname = false\n"
                " udp_preference_limit = 1\n"
                "[realms]\n %s = {\n  kdc = 127.0.0.1:%d\n }\n"
                "[domain_realm]\n localhost = %s\n" % (REALM, REALM, port, REALM))
    with open(os.path.join(d, "kdc.conf"), "w") as f:
        f.write("[kdcdefaults]\n kdc_ports = %d\n kdc_tcp_ports = %d\n"
                "[realms]\n %s = {\n  database_name = %s/principal\n"
                "  key_stash_file = %s/stash\n  acl_file = %s/kadm5.acl\n }\n"
                "[logging]\n kdc = FILE:%s/kdc.log\n"
                % (port, port, REALM, d, d, d, d))
    env = dict(os.environ, KRB5_CONFIG=d + "/krb5.conf",
               KRB5_KDC_PROFILE=d + "/kdc.conf",
               KRB5CCNAME="FILE:%s/ccache" % d)
    run(["kdb5_util", "create", "-s", "-r", REALM, "-P", "master-pw"], env)
    keytab = d + "/libvirt.keytab"
    for q in ("addprinc -randkey libvirt/localhost",
              "ktadd -k %s libvirt/localhost" % keytab,
              "addprinc -pw alice-pw alice",
              "addprinc -pw mallory-pw mallory"):
        run(["kadmin.local", "-r", REALM, "-q", q], env)
    proc = subprocess.Popen(["krb5kdc", "-n", "-P", d + "/kdc.pid"], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: harness.tcp_accepts("127.0.0.1", port), 10)
        yield {"env": env, "keytab": keytab, "dir": d}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def gw(kdc, shared_libvirtd, gateway):
    port = harness.free_port()
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
        default_upstream="hv1",
        listeners=[{"name": "krb", "address": "127.0.0.1:%d" % port,
                    "auth": "sasl"}],
        sasl={"mechanisms": ["gssapi"], "keytab": kdc["keytab"],
              "service_host": "localhost", "allowed_users": ["alice"]},
        admin=True)
    g = gateway(cfg, env={"KRB5_CONFIG": kdc["env"]["KRB5_CONFIG"]})
    return g, port


def kinit(kdc, user, password):
    run(["kinit", user], kdc["env"], input_text=password + "\n")


def virsh_krb(kdc, port, *args):
    env_keys = ("KRB5_CONFIG", "KRB5CCNAME")
    old = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: kdc["env"][k] for k in env_keys})
    try:
        return virsh("test+tcp://localhost:%d/default" % port, *args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_gssapi_login_with_security_layer(kdc, gw):
    g, port = gw
    kinit(kdc, "alice", "alice-pw")
    out = virsh_krb(kdc, port, "list")
    assert out.returncode == 0 and "test" in out.stdout, (out.stdout,
                                                         out.stderr)
    log = g.log_text()
    assert "authenticated (sasl) as alice@krb" in log, g.log_tail()
    assert "SASL security layer on" in log


def test_gssapi_user_outside_allowlist_is_refused(kdc, gw):
    g, port = gw
    kinit(kdc, "mallory", "mallory-pw")
    out = virsh_krb(kdc, port, "list")
    assert out.returncode != 0
    assert "authentication failed" in out.stderr, out.stderr
    assert 'user "mallory' in g.log_text()


def test_gssapi_without_ticket_is_refused(kdc, gw):
    g, port = gw
    out = virsh_krb(kdc, port, "list")  # no kinit: empty credential cache
    assert out.returncode != 0, out.stdout
