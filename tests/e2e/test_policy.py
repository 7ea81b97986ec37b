"""Per-client policy: read-only listeners seen through virsh, read-only
upstream sockets, the upstream allowlist per identity (unix uid, listener),
default deny/allow, max_sessions, source CIDR rules, and --check-config.

What reached libvirtd is judged by the tap (tap.py) and by libvirtd's own
state and client list, never by the gateway's word alone.
"""

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import libvirt
import pytest

import harness
import tap as tapmod
from harness import (RawClient, STATUS_ERROR, STATUS_OK, call_with_timeout,
                     check_config, decode_error, virsh, wait_until)

VIR_ERR_ACCESS_DENIED = 88
VIR_ERR_OPERATION_DENIED = 29
REMOTE = harness.REMOTE_PROGRAM

NEW_DOMAIN_XML = """<domain type='test'>
  <name>policy-new</name>
  <memory>8192</memory>
  <os><type>hvm</type></os>
</domain>
"""
IDLE_DOMAIN_XML = NEW_DOMAIN_XML.replace("policy-new", "policy-idle")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def tcp_listener(name, readonly=False):
    lst = {"name": name, "address": "127.0.0.1:%d" % harness.free_port(),
           "auth": "none"}
    if readonly:
        lst["readonly"] = True
    return lst


def with_admin(cfg):
    cfg["admin"] = {"address": "127.0.0.1:%d" % harness.free_port()}
    return cfg


def status(gw):
    return tapmod.admin_status(gw.config["admin"]["address"])


def listener_uri(gw, name, path="default"):
    for lst in gw.config["listeners"]:
        if lst["name"] == name:
            if "unix" in lst:
                return "test+unix:///%s?socket=%s" % (path, lst["unix"])
            host, port = harness.split_address(lst["address"])
            return "test+tcp://%s:%d/%s" % (host, port, path)
    raise KeyError(name)


def listener_port(gw, name):
    for lst in gw.config["listeners"]:
        if lst["name"] == name:
            return harness.split_address(lst["address"])[1]
    raise KeyError(name)


def open_error(uri, readonly=False, timeout=15.0):
    """Open uri with libvirt-python; return the libvirtError, or None (the
    connection is closed again) if the open succeeded."""
    def attempt():
        try:
            conn = (libvirt.openReadOnly if readonly else libvirt.open)(uri)
        except libvirt.libvirtError as e:
            return e
        try:
            conn.listAllDomains(0)
        finally:
            conn.close()
        return None
    return call_with_timeout(attempt, timeout=timeout)


def assert_access_denied(err, *words):
    assert err is not None, "open was admitted; expected access denied"
    assert err.get_error_code() == VIR_ERR_ACCESS_DENIED, (
        err.get_error_code(), err.get_error_message())
    msg = err.get_error_message()
    assert msg.startswith("access denied"), msg
    assert "virtmux policy" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def raw_open(client, name="test:///default", flags=0):
    """AUTH_LIST + CONNECT_OPEN on a raw client; returns (ok, error dict)."""
    client.auth_list()
    pkt = client.connect_open(name, flags)
    if pkt.status == STATUS_OK:
        return True, None
    return False, decode_error(pkt.payload)


class SourceBoundClient(RawClient):
    """RawClient whose TCP socket is bound to a chosen source address."""

    def __init__(self, port, source, host="127.0.0.1", timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0))
        self.timeout = timeout
        self.serial = 0
        self._buf = b""
        self.messages = []


def denials(st, identity=None, procedure=None, upstream=None):
    total = 0
    for d in st["denials"]:
        if ((identity is None or d["identity"] == identity)
                and (procedure is None or d["procedure"] == procedure)
                and (upstream is None or d["upstream"] == upstream)):
            total += d["count"]
    return total


@pytest.fixture
def tmpdir_shared(request):
    """A temporary directory every uid can enter (for unix sockets used by
    an unprivileged client)."""
    d = tempfile.mkdtemp(prefix="virtmux-policy-")
    os.chmod(d, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    return d


# --------------------------------------------------------------------------
# virsh through a read-only listener
# --------------------------------------------------------------------------

def _stable(text):
    """virsh output without the one line that changes by itself: the test
    driver's CPU time grows with the wall clock."""
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("CPU time:"))


def test_virsh_through_readonly_listener(libvirtd, gateway, tmp_path):
    direct = libvirtd.direct_uri
    # libvirtd's test:///default state lives while a connection holds it:
    # keep one open for the whole test so that "unchanged" means something
    keeper = call_with_timeout(libvirt.open, direct)
    tap = tapmod.Tap(libvirtd.port)
    try:
        keeper.defineXML(IDLE_DOMAIN_XML)      # an inactive domain to start
        cfg = harness.make_config(
            [harness.upstream_entry("hv1", tap.uri())],
            default_upstream="hv1",
            listeners=[tcp_listener("mon", readonly=True)])
        gw = gateway(with_admin(cfg))
        uri = listener_uri(gw, "mon")
        before = tapmod.libvirtd_state(direct)
        st0 = status(gw)

        # reads: identical to a direct connection
        for args in (("list", "--all"), ("list",), ("dominfo", "test"),
                     ("dumpxml", "test"), ("net-list", "--all"),
                     ("pool-list", "--all")):
            via = virsh(uri, *args)
            ref = virsh(direct, *args)
            assert via.returncode == 0, (args, via.stderr)
            assert ref.returncode == 0, (args, ref.stderr)
            assert _stable(via.stdout) == _stable(ref.stdout), args

        # writes: refused by the gateway (virsh does not know it is
        # read-only: it opened without VIR_CONNECT_RO)
        xml = tmp_path / "new.xml"
        xml.write_text(NEW_DOMAIN_XML)
        mark = tap.mark()
        writes = [
            (("destroy", "test"),
             "read only access prevents virDomainDestroy"),
            (("start", "policy-idle"),
             "read only access prevents virDomainCreate"),
            (("define", str(xml)),
             "read only access prevents virDomainDefineXML"),
            (("dumpxml", "--security-info", "test"),
             "virDomainGetXMLDesc with secure flag"),
            (("suspend", "test"),
             "read only access prevents virDomainSuspend"),
            (("undefine", "policy-idle"),
             "read only access prevents virDomainUndefine"),
        ]
        for args, words in writes:
            r = virsh(uri, *args)
            assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
            assert "operation forbidden" in r.stderr, (args, r.stderr)
            assert words in r.stderr, (args, r.stderr)

        # virsh start on a running domain stops in virsh itself; report it
        r = virsh(uri, "start", "test")
        assert r.returncode == 1, r.stdout

        # none of the writes reached libvirtd
        forbidden = {12, 234, 9, 196, 11, 350, 34, 35, 231}
        leaked = [f for f in tap.calls(mark) if f.prog == REMOTE
                  and f.proc in forbidden]
        assert not leaked, leaked
        for f in tap.calls(mark, REMOTE, 14):
            flags = struct.unpack(">I", f.args[-4:])[0]
            assert not flags & 9, "GET_XML_DESC flags %#x reached libvirtd" % (
                flags,)
        assert tapmod.libvirtd_state(direct) == before

        st1 = status(gw)
        assert st1["denials_total"] - st0["denials_total"] >= len(writes)
        assert denials(st1, "127.0.0.1@mon", "DOMAIN_DESTROY", "hv1") == 1
        assert "denied: identity=127.0.0.1@mon procedure=DOMAIN_DESTROY " \
               "upstream=hv1" in gw.log_text()
        # every client of this listener rode one read-only pool
        assert st1["pools"] and all(p["readonly"] for p in st1["pools"]), \
            st1["pools"]
    finally:
        tap.stop()
        keeper.close()


# --------------------------------------------------------------------------
# read-only sessions ride read-only upstream sockets (libvirtd's own view)
# --------------------------------------------------------------------------

def _ro_flags(lvd):
    return sorted(c.get("readonly") for c in lvd.clients())


def test_upstream_socket_readonly_per_virt_admin(libvirtd, gateway,
                                                 connections):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri)],
        default_upstream="hv1",
        listeners=[tcp_listener("rw"), tcp_listener("mon", readonly=True)])
    gw = gateway(with_admin(cfg))
    assert _ro_flags(libvirtd) == []

    rw = call_with_timeout(libvirt.open, listener_uri(gw, "rw"))
    connections.append(rw)
    rw.listAllDomains(0)
    assert wait_until(lambda: _ro_flags(libvirtd) == ["no"], 5.0), \
        libvirtd.clients()

    ro = call_with_timeout(libvirt.openReadOnly, listener_uri(gw, "rw"))
    connections.append(ro)
    ro.listAllDomains(0)
    assert wait_until(lambda: _ro_flags(libvirtd) == ["no", "yes"], 5.0), \
        libvirtd.clients()

    # a client of the read-only listener opened without the RO flag: it
    # shares the read-only upstream socket, it does not get a writable one
    mon = call_with_timeout(libvirt.open, listener_uri(gw, "mon"))
    connections.append(mon)
    mon.listAllDomains(0)
    time.sleep(0.2)
    assert _ro_flags(libvirtd) == ["no", "yes"], libvirtd.clients()
    pools = {p["readonly"]: p for p in status(gw)["pools"]}
    assert set(pools) == {True, False}, pools
    assert sum(l["sessions"] for l in pools[True]["links"]) == 2, pools
    assert sum(l["sessions"] for l in pools[False]["links"]) == 1, pools

    # and libvirtd itself refuses writes on it (second line of defence)
    with pytest.raises(libvirt.libvirtError) as ei:
        mon.lookupByName("test").destroy()
    assert ei.value.get_error_code() == VIR_ERR_OPERATION_DENIED
    assert rw.lookupByName("test").info()[0] == libvirt.VIR_DOMAIN_RUNNING


# --------------------------------------------------------------------------
# upstream allowlist per identity
# --------------------------------------------------------------------------

def _virsh_as(uid, uri, *args, home, timeout=20.0):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
           "HOME": home, "XDG_CACHE_HOME": os.path.join(home, "cache"),
           "XDG_CONFIG_HOME": os.path.join(home, "config"),
           "XDG_RUNTIME_DIR": os.path.join(home, "run")}
    cmd = [harness.SETPRIV or "/usr/bin/setpriv", "--reuid=%d" % uid,
           "--regid=%d" % uid, "--clear-groups", harness.VIRSH, "-c", uri]
    cmd += list(args)
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("virsh as uid %d timed out: %s" % (uid, cmd)) \
            from e


def test_upstream_allowlist_by_unix_uid(two_libvirtd, gateway,
                                        tmpdir_shared):
    hv1, hv2 = two_libvirtd
    sock = os.path.join(tmpdir_shared, "virtmux-sock")
    cfg = {
        "listeners": [{"name": "local", "unix": sock, "mode": "0666",
                       "auth": "none"}],
        "upstreams": [harness.upstream_entry("hv1", hv1.direct_uri),
                      harness.upstream_entry("hv2", hv2.direct_uri)],
        "default_upstream": "hv1",
        "policy": {"default": "deny", "rules": [
            {"match": {"unix_uid": 0}, "upstreams": ["hv1"]},
            {"match": {"unix_gid": 65534}, "upstreams": ["hv2"]},
        ]},
    }
    gw = gateway(with_admin(cfg))
    uri1 = "test+unix:///hv1/default?socket=%s" % sock
    uri2 = "test+unix:///hv2/default?socket=%s" % sock
    direct_list = virsh(hv1.direct_uri, "list", "--all")

    # root: hv1 yes, hv2 no
    r = virsh(uri1, "list", "--all")
    assert r.returncode == 0, r.stderr
    assert r.stdout == direct_list.stdout
    assert open_error(uri1) is None
    err = open_error(uri2)
    assert_access_denied(err, "uid=0@local", "hv2")
    r = virsh(uri2, "list")
    assert r.returncode == 1 and "access denied" in r.stderr, r.stderr
    # the default route (hv1) is on root's list too
    assert open_error("test+unix:///default?socket=%s" % sock) is None

    # uid 65534: the other way round
    home = tempfile.mkdtemp(prefix="virtmux-nobody-")
    os.chmod(home, 0o777)
    try:
        r = _virsh_as(65534, uri2, "list", "--all", home=home)
        assert r.returncode == 0, r.stderr
        assert r.stdout == virsh(hv2.direct_uri, "list", "--all").stdout
        r = _virsh_as(65534, uri1, "list", home=home)
        assert r.returncode == 1, r.stdout
        assert "access denied" in r.stderr and "hv1" in r.stderr, r.stderr
        assert "uid=65534@local" in r.stderr, r.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)

    st = status(gw)
    assert denials(st, "uid=0@local", "CONNECT_OPEN", "hv2") == 2, st
    assert denials(st, "uid=65534@local", "CONNECT_OPEN", "hv1") == 1, st
    assert st["denials_total"] == 3, st
    log = gw.log_text()
    assert "denied: identity=uid=0@local procedure=CONNECT_OPEN " \
           "upstream=hv2" in log
    assert "denied: identity=uid=65534@local procedure=CONNECT_OPEN " \
           "upstream=hv1" in log
    # the refused opens never reached hv2 for root / hv1 for nobody: only
    # the admitted identities' pools exist
    keys = sorted((p["upstream"], p["readonly"]) for p in st["pools"])
    assert keys == [("hv1", False), ("hv2", False)], keys


def test_upstream_allowlist_by_listener_glob(two_libvirtd, gateway):
    hv1, hv2 = two_libvirtd
    cfg = {
        "listeners": [tcp_listener("ops-a"), tcp_listener("mon")],
        "upstreams": [harness.upstream_entry("hv1", hv1.direct_uri),
                      harness.upstream_entry("hv2", hv2.direct_uri)],
        "default_upstream": "hv1",
        "policy": {"default": "deny", "rules": [
            {"match": {"listener": "ops-*"}, "upstreams": "*"},
            {"match": {"listener": "mon"}, "readonly": True,
             "upstreams": ["hv1"]},
        ]},
    }
    gw = gateway(with_admin(cfg))
    assert open_error(listener_uri(gw, "ops-a", "hv2/default")) is None
    assert open_error(listener_uri(gw, "ops-a", "hv1/default")) is None
    assert_access_denied(open_error(listener_uri(gw, "mon", "hv2/default")),
                         "127.0.0.1@mon", "hv2")
    # mon reaches hv1, read-only although the client asked read-write
    r = virsh(listener_uri(gw, "mon", "hv1/default"), "destroy", "test")
    assert r.returncode == 1, r.stdout
    assert "read only access prevents virDomainDestroy" in r.stderr
    keeper = call_with_timeout(libvirt.open, hv1.direct_uri)
    try:
        assert keeper.lookupByName("test").isActive()
    finally:
        keeper.close()
    st = status(gw)
    assert denials(st, "127.0.0.1@mon", "CONNECT_OPEN", "hv2") == 1, st


# --------------------------------------------------------------------------
# default deny / allow, rules that cannot match yet
# --------------------------------------------------------------------------

def _one_upstream_cfg(lvd, policy, listeners=None):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri)],
        default_upstream="hv1",
        listeners=listeners or [tcp_listener("tcp")])
    cfg["policy"] = policy
    return with_admin(cfg)


def test_default_deny_and_default_allow(libvirtd, gateway):
    rules = [{"match": {"listener": "elsewhere"}, "upstreams": "*"},
             # auth is none: rules on SASL users or certificate DNs never
             # match yet, even with a catch-all glob
             {"match": {"sasl_user": "*"}, "upstreams": "*"},
             {"match": {"tls_dn": "*"}, "upstreams": "*"}]
    gw = gateway(_one_upstream_cfg(libvirtd, {"default": "deny",
                                              "rules": rules}))
    err = open_error(gw.uri())
    assert_access_denied(err, "127.0.0.1@tcp")
    assert_access_denied(open_error(gw.uri(), readonly=True))
    with RawClient(port=gw.port) as c:
        ok, e = raw_open(c)
        assert not ok and e["code"] == VIR_ERR_ACCESS_DENIED, e
        # a refused client is not open: calls are refused before any policy
        pkt = c.call(harness.PROC_CONNECT_LIST_ALL_DOMAINS,
                     harness.xdr_i32(1) + harness.xdr_u32(0))
        assert pkt.status == STATUS_ERROR
        assert "not open" in decode_error(pkt.payload)["message"]
    st = status(gw)
    assert denials(st, "127.0.0.1@tcp", "CONNECT_OPEN") == 3, st
    assert st["pools"] == [], st["pools"]     # nothing was opened upstream
    assert libvirtd.nclients() == 0

    gw2 = gateway(_one_upstream_cfg(libvirtd, {"default": "allow",
                                               "rules": rules}))
    assert open_error(gw2.uri()) is None
    r = virsh(gw2.uri(), "list", "--all")
    assert r.returncode == 0, r.stderr
    assert status(gw2)["denials_total"] == 0


def test_default_grant_object(libvirtd, gateway):
    """policy.default may be a grant: here everyone is admitted read-only."""
    gw = gateway(_one_upstream_cfg(libvirtd, {"default": {"readonly": True,
                                                          "upstreams": "*"}}))
    r = virsh(gw.uri(), "list", "--all")
    assert r.returncode == 0, r.stderr
    r = virsh(gw.uri(), "destroy", "test")
    assert r.returncode == 1
    assert "read only access prevents virDomainDestroy" in r.stderr
    assert wait_until(lambda: [c.get("readonly") for c in libvirtd.clients()]
                      == ["yes"], 5.0), libvirtd.clients()


# --------------------------------------------------------------------------
# max_sessions
# --------------------------------------------------------------------------

def test_max_sessions(libvirtd, gateway):
    gw = gateway(_one_upstream_cfg(libvirtd, {
        "default": "deny",
        "rules": [{"match": {"listener": "tcp"}, "upstreams": "*",
                   "max_sessions": 2}]}))
    a, b, c, d = (RawClient(port=gw.port) for _ in range(4))
    try:
        assert raw_open(a) == (True, None)
        assert raw_open(b) == (True, None)
        ok, err = raw_open(c)
        assert not ok, "third concurrent session admitted"
        assert err["code"] == VIR_ERR_ACCESS_DENIED, err
        assert err["message"].startswith("access denied"), err
        assert "2 sessions" in err["message"], err
        # libvirt-python sees the same
        assert_access_denied(open_error(gw.uri()), "127.0.0.1@tcp")
        st = status(gw)
        assert denials(st, "127.0.0.1@tcp", "CONNECT_OPEN", "hv1") == 2, st

        # one leaves (CONNECT_CLOSE, then the gateway hangs up)
        pkt = a.call(harness.PROC_CONNECT_CLOSE)
        assert pkt.status == STATUS_OK
        assert a.wait_closed(3.0)
        # the refused client retries on the same socket and gets in
        ok = wait_until(lambda: raw_open_again(c), 5.0, 0.1)
        assert ok, "no session admitted after one of two closed"
        # now full again
        ok, err = raw_open(d)
        assert not ok and err["code"] == VIR_ERR_ACCESS_DENIED, err
        # a client that just disconnects frees its slot too
        b.close()
        assert wait_until(lambda: raw_open_again(d), 5.0, 0.1)
        # the admitted sessions work
        for cl in (c, d):
            assert [x["name"] for x in cl.list_all_domains()] == ["test"]
    finally:
        for cl in (a, b, c, d):
            cl.close()


def raw_open_again(client):
    """CONNECT_OPEN again on a client whose earlier open was refused."""
    pkt = client.connect_open("test:///default", 0)
    return pkt.status == STATUS_OK


# --------------------------------------------------------------------------
# source CIDR
# --------------------------------------------------------------------------

def test_source_cidr_rule(libvirtd, gateway):
    gw = gateway(_one_upstream_cfg(libvirtd, {
        "default": "deny",
        "rules": [{"match": {"source": "127.0.0.2/32"}, "deny": True},
                  {"match": {"source": "127.0.0.0/29"}, "readonly": True,
                   "upstreams": "*"},
                  {"match": {"source": "127.0.0.0/8"}, "upstreams": "*"}]}))
    with SourceBoundClient(gw.port, "127.0.0.2") as c2:
        ok, err = raw_open(c2)
        assert not ok, "127.0.0.2 admitted despite the deny rule"
        assert err["code"] == VIR_ERR_ACCESS_DENIED, err
        assert "127.0.0.2@tcp" in err["message"], err
    with SourceBoundClient(gw.port, "127.0.0.1") as c1:
        assert raw_open(c1) == (True, None)
        dom = c1.lookup_domain("test")
        # 127.0.0.1 matched the /29 rule: read-only
        pkt = c1.call(harness.PROC_DOMAIN_DESTROY,
                      harness.xdr_domain(dom["name"], dom["uuid"], dom["id"]))
        assert pkt.status == STATUS_ERROR
        assert decode_error(pkt.payload)["code"] == VIR_ERR_OPERATION_DENIED
    with SourceBoundClient(gw.port, "127.0.0.9") as c9:
        # outside the /29: read-write
        assert raw_open(c9) == (True, None)
        assert [d["name"] for d in c9.list_all_domains()] == ["test"]
    st = status(gw)
    assert denials(st, "127.0.0.2@tcp", "CONNECT_OPEN") == 1, st
    assert denials(st, "127.0.0.1@tcp", "DOMAIN_DESTROY", "hv1") == 1, st
    assert st["denials_total"] == 2, st
    assert "denied: identity=127.0.0.2@tcp procedure=CONNECT_OPEN" \
        in gw.log_text()
    keeper = call_with_timeout(libvirt.open, libvirtd.direct_uri)
    try:
        assert keeper.lookupByName("test").isActive()
    finally:
        keeper.close()


# --------------------------------------------------------------------------
# --check-config
# --------------------------------------------------------------------------

BASE = {
    "listeners": [{"name": "tcp", "address": "127.0.0.1:16509",
                   "auth": "none"}],
    "upstreams": [{"name": "hv1", "uri": "test+tcp://127.0.0.1:26509/default"},
                  {"name": "hv2", "uri": "test+tcp://127.0.0.1:26510/default"}],
    "default_upstream": "hv1",
}


def _with_policy(policy):
    cfg = dict(BASE)
    cfg["policy"] = policy
    return cfg


BAD_POLICIES = [
    ({"rules": [{"match": {}, "upstreams": ["hv1", "hv9"]}]},
     ["policy.rules[0].upstreams", "hv9"]),
    ({"rules": [{"match": {"source": "10.0.0.0/33"}}]},
     ["policy.rules[0].match.source", "10.0.0.0/33"]),
    ({"rules": [{"match": {"source": "10.0.0.300"}}]},
     ["policy.rules[0].match.source"]),
    ({"rules": [{"match": {"source": "not-an-address"}}]},
     ["policy.rules[0].match.source"]),
    ({"rules": [{"match": {}, "readonly": True, "colour": "red"}]},
     ["policy.rules[0].colour", "unknown key"]),
    ({"rules": [{"match": {"src": "10.0.0.0/8"}}]},
     ["policy.rules[0].match.src", "unknown key"]),
    ({"default": "deny", "rule": []},
     ["policy.rule", "unknown key"]),
    ({"default": "maybe"}, ["policy.default"]),
    ({"default": {"upstreams": ["nowhere"]}},
     ["policy.default.upstreams", "nowhere"]),
    ({"rules": [{"upstreams": "all"}]}, ["policy.rules[0].upstreams"]),
    ({"rules": [{"deny": "yes"}]}, ["policy.rules[0].deny"]),
    ({"rules": [{"max_sessions": -1}]}, ["policy.rules[0].max_sessions"]),
    ({"rules": [{"match": {"unix_uid": "root"}}]},
     ["policy.rules[0].match.unix_uid"]),
    ({"rules": [{"match": {}}, {"match": {}, "upstreams": ["hv3"]}]},
     ["policy.rules[1].upstreams", "hv3"]),
]


@pytest.mark.parametrize("policy,words", BAD_POLICIES,
                         ids=[w[0] for _, w in BAD_POLICIES])
def test_check_config_rejects_bad_policy(virtmux_bin, policy, words):
    r = check_config(_with_policy(policy), binary=virtmux_bin)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_check_config_accepts_good_policy(virtmux_bin):
    policy = {"default": {"readonly": True, "upstreams": ["hv1"]},
              "rules": [
                  {"match": {"source": "10.20.0.0/16"}, "readonly": True,
                   "upstreams": "*"},
                  {"match": {"source": "fd00::/8", "listener": "t*"},
                   "upstreams": ["hv1", "hv2"], "max_sessions": 5},
                  {"match": {"unix_uid": 0, "unix_gid": 0}},
                  {"match": {"sasl_user": "ops-*", "tls_dn": "CN=*"},
                   "deny": True}]}
    r = check_config(_with_policy(policy), binary=virtmux_bin)
    assert r.returncode == 0, r.stderr
