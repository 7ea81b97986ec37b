"""Domain grants: a policy rule's ``domains`` limits which domains a client
sees and touches, on every host.

The gateway is checked against libvirtd itself: what reached libvirtd is
judged by a counting relay (tap.py) between them, and every answer is
compared with what a direct connection says (the not-found wording of the
driver, the bytes of a list filtered here).

Domains: "test" (the test driver's own, running), web-1 (running), web-2,
web-secret and vault-1 (running). The grant is ["web-*", "!web-secret"].
"""

import re
import time
import uuid as uuidlib

import libvirt
import pytest

import harness
import tap as tapmod
from harness import (REMOTE_PROGRAM, STATUS_ERROR, STATUS_OK, RawClient,
                     XdrReader, call_with_timeout, decode_error, virsh,
                     xdr_domain, xdr_i32, xdr_string, xdr_u32)

GRANT = ["web-*", "!web-secret"]
GRANTED = {"web-1", "web-2"}
ALL_NAMES = ["web-1", "web-2", "web-secret", "vault-1"]
VIR_ERR_NO_DOMAIN = 42
VIR_FROM_TEST = 12
VIR_ERR_ACCESS_DENIED = 88
VIR_FROM_ACCESS = 55
VIR_ERR_OPERATION_DENIED = 29
PROGRAMS = {"REMOTE": REMOTE_PROGRAM, "QEMU": 0x20008087, "LXC": 0x00068000}


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        return [dict(zip(header, line.rstrip("\n").split("\t")))
                for line in f if line.strip()]


def _rows():
    return read_tsv(harness.REPO_ROOT / "data" / "procedures.tsv")


PROC = {r["name"]: int(r["number"]) for r in _rows()
        if r["program"] == "REMOTE"}

DOMAIN_XML = """<domain type='test'>
  <name>%s</name>
  <memory>8192</memory>
  <os><type>hvm</type></os>
</domain>
"""


def define_domains(conn):
    for name in ALL_NAMES:
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError:
            conn.defineXML(DOMAIN_XML % name)
    for name in ("web-1", "vault-1"):
        dom = conn.lookupByName(name)
        if not dom.isActive():
            dom.create()


@pytest.fixture
def hv(libvirtd, gateway, request):
    """libvirtd with the domains, a tap in front of it, and a gateway whose
    tcp listener grants GRANT; the "ro" listener grants the same read-only,
    the "all" listener everything."""
    keeper = call_with_timeout(libvirt.open, libvirtd.direct_uri)
    request.addfinalizer(keeper.close)
    define_domains(keeper)
    tap = tapmod.Tap(libvirtd.port)
    request.addfinalizer(tap.stop)
    listeners = [
        {"name": n, "address": "127.0.0.1:%d" % harness.free_port(),
         "auth": "none"} for n in ("tcp", "ro", "all")]
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", tap.uri())], default_upstream="hv1",
        listeners=listeners, admin=True)
    cfg["policy"] = {"default": "deny", "rules": [
        {"match": {"listener": "tcp"}, "domains": GRANT},
        {"match": {"listener": "ro"}, "domains": GRANT, "readonly": True},
        {"match": {"listener": "all"}},
    ]}
    gw = gateway(cfg)

    return harness.Endpoints(listeners, lvd=libvirtd, tap=tap, gw=gw,
                             direct=keeper)


def granted(names):
    return sorted(n for n in names if n in GRANTED)


def open_gw(h, listener="tcp"):
    return call_with_timeout(libvirt.open, h.uri[listener])


def no_domain_error(e):
    return (e.get_error_code(), e.get_error_domain(), e.get_error_message())


def direct_error(fn):
    try:
        fn()
    except libvirt.libvirtError as e:
        return no_domain_error(e)
    raise AssertionError("the direct call did not fail")


# --------------------------------------------------------------------------
# lists, counts, stats
# --------------------------------------------------------------------------

def test_virsh_lists_only_granted_domains(hv):
    out = virsh(hv.uri["tcp"], "list", "--all", "--name")
    assert out.returncode == 0, out.stderr
    assert sorted(l for l in out.stdout.split() if l) == sorted(GRANTED)
    direct = virsh(hv.lvd.direct_uri, "list", "--all", "--name")
    assert "vault-1" in direct.stdout and "test" in direct.stdout
    # domstats: only web-1 and web-2 records
    out = virsh(hv.uri["tcp"], "domstats", "--raw")
    assert out.returncode == 0, out.stderr
    shown = re.findall(r"^Domain: '([^']+)'", out.stdout, re.M)
    assert sorted(shown) == sorted(GRANTED), out.stdout
    # the listener without a grant sees everything
    out = virsh(hv.uri["all"], "list", "--all", "--name")
    assert "vault-1" in out.stdout and "test" in out.stdout


def test_python_lists_counts_and_stats_are_filtered(hv):
    c = open_gw(hv)
    try:
        d = hv.direct
        assert sorted(x.name() for x in c.listAllDomains()) == sorted(GRANTED)
        active = [x.name() for x in d.listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        inactive = [x.name() for x in d.listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)]
        assert sorted(c.lookupByID(i).name() for i in c.listDomainsID()) \
            == granted(active)
        assert sorted(c.listDefinedDomains()) == granted(inactive)
        assert c.numOfDomains() == len(granted(active)) == 1
        assert c.numOfDefinedDomains() == len(granted(inactive)) == 1
        stats = c.getAllDomainStats()
        assert sorted(dom.name() for dom, _ in stats) == sorted(GRANTED)
        # virDomainListGetStats with a granted and (through a handle of the
        # unrestricted listener) a forbidden domain: only the granted one
        web1 = c.lookupByName("web-1")
        recs = c.domainListGetStats([web1])
        assert [dom.name() for dom, _ in recs] == ["web-1"]
    finally:
        c.close()


def _raw_list_all(port, flags=0, need_results=1):
    with RawClient(port=port, timeout=10.0) as rc:
        rc.handshake()
        pkt = rc.check_ok(rc.call(PROC["CONNECT_LIST_ALL_DOMAINS"],
                                  xdr_i32(need_results) + xdr_u32(flags)))
        return pkt.payload


def _split_domains(payload):
    """[(name, raw bytes of the remote_nonnull_domain)], ret."""
    r = XdrReader(payload)
    out = []
    for _ in range(r.u32()):
        start = r.pos
        dom = r.domain()
        out.append((dom["name"], payload[start:r.pos]))
    return out, r.u32()


def test_filtered_list_is_byte_correct(hv):
    """The gateway's CONNECT_LIST_ALL_DOMAINS reply equals libvirtd's own,
    filtered here: same records, same bytes, same order, count included;
    need_results=0 gives the filtered count only."""
    for flags in (0, 1, 2):
        direct, _ = _split_domains(_raw_list_all(hv.lvd.port, flags))
        want = [raw for name, raw in direct if name in GRANTED]
        got = _raw_list_all(hv.port["tcp"], flags)
        expected = xdr_u32(len(want)) + b"".join(want) + xdr_u32(len(want))
        assert got == expected, (flags, got, expected)
        count_only = _raw_list_all(hv.port["tcp"], flags, need_results=0)
        assert count_only == xdr_u32(0) + xdr_u32(len(want))


def _raw_stats(port):
    """CONNECT_GET_ALL_DOMAIN_STATS(no domains, stats 0, flags 0) ->
    [(name, raw handle bytes, [field names])]."""
    with RawClient(port=port, timeout=10.0) as rc:
        rc.handshake()
        pkt = rc.check_ok(rc.call(PROC["CONNECT_GET_ALL_DOMAIN_STATS"],
                                  xdr_u32(0) + xdr_u32(0) + xdr_u32(0)))
    r = XdrReader(pkt.payload)
    out = []
    for _ in range(r.u32()):
        start = r.pos
        dom = r.domain()
        raw = pkt.payload[start:r.pos]
        fields = []
        for _ in range(r.u32()):
            fields.append(r.string())
            t = r.i32()
            if t in (1, 2, 6):
                r.u32()
            elif t in (3, 4, 5):
                r.u64()
            elif t == 7:
                r.string()
            else:
                raise AssertionError("typed param type %d" % t)
        out.append((dom["name"], raw, fields))
    assert r.remaining() == 0
    return out


def test_filtered_stats_keep_libvirtds_records(hv):
    """Through the grant, CONNECT_GET_ALL_DOMAIN_STATS holds exactly the
    granted records of libvirtd's own reply, in its order, each with the
    same domain bytes and the same fields."""
    direct = [(n, raw, f) for n, raw, f in _raw_stats(hv.lvd.port)
              if n in GRANTED]
    got = _raw_stats(hv.port["tcp"])
    assert [(n, raw, f) for n, raw, f in got] == direct
    assert len(got) == 2


# --------------------------------------------------------------------------
# lookups and handles
# --------------------------------------------------------------------------

def test_lookups_outside_the_grant_are_not_found(hv):
    vault = hv.direct.lookupByName("vault-1")
    # what the driver says for a domain that does not exist
    missing_name = direct_error(lambda: hv.direct.lookupByName("nosuch-dom"))
    missing_uuid = direct_error(
        lambda: hv.direct.lookupByUUIDString(str(uuidlib.uuid4())))
    missing_id = direct_error(lambda: hv.direct.lookupByID(9999))
    assert missing_name[:2] == (VIR_ERR_NO_DOMAIN, VIR_FROM_TEST)
    c = open_gw(hv)
    try:
        mark = hv.tap.mark()
        for fn, want in ((lambda: c.lookupByName("vault-1"), missing_name),
                         (lambda: c.lookupByName("web-secret"), missing_name),
                         (lambda: c.lookupByName("test"), missing_name),
                         (lambda: c.lookupByUUID(vault.UUID()), missing_uuid),
                         (lambda: c.lookupByID(vault.ID()), missing_id)):
            with pytest.raises(libvirt.libvirtError) as ei:
                fn()
            assert no_domain_error(ei.value) == want
        # by name: never forwarded (by UUID and ID the reply is checked)
        assert not hv.tap.calls(mark, proc=PROC["DOMAIN_LOOKUP_BY_NAME"])
        assert c.lookupByName("web-1").name() == "web-1"
        web1 = hv.direct.lookupByName("web-1")
        assert c.lookupByUUID(web1.UUID()).name() == "web-1"
        assert c.lookupByID(web1.ID()).name() == "web-1"
    finally:
        c.close()


def test_forged_and_foreign_handles_are_not_found(hv):
    """libvirtd finds a domain by the UUID in the handle. A handle the
    session was never shown (a forbidden domain's real UUID, even under a
    granted name) is answered "not found" without reaching libvirtd, worded
    as the driver words a handle it cannot find."""
    vault = hv.direct.lookupByName("vault-1")
    vault_uuid = vault.UUID()
    with RawClient(port=hv.port["tcp"], timeout=10.0) as rc:
        rc.handshake()
        web1 = rc.lookup_domain("web-1")
        mark = hv.tap.mark()
        for name in ("vault-1", "web-1"):
            pkt = rc.call(PROC["DOMAIN_GET_INFO"],
                          xdr_domain(name, vault_uuid, vault.ID()))
            assert pkt.status == STATUS_ERROR
            err = decode_error(pkt.payload)
            assert (err["code"], err["domain"]) == (VIR_ERR_NO_DOMAIN,
                                                    VIR_FROM_TEST)
            assert err["message"] == (
                "Domain not found: no domain with matching uuid '%s' (%s)"
                % (vault.UUIDString(), name))
        assert not hv.tap.calls(mark, proc=PROC["DOMAIN_GET_INFO"])
        # the granted handle it was shown works
        info = rc.domain_info(web1)
        assert info[0] == libvirt.VIR_DOMAIN_RUNNING
    # the wording is libvirtd's own for a handle it cannot find
    gone = hv.direct.defineXML(DOMAIN_XML % "gone-1")
    gone.undefine()
    with pytest.raises(libvirt.libvirtError) as ei:
        gone.info()
    assert ei.value.get_error_message() == (
        "Domain not found: no domain with matching uuid '%s' (gone-1)"
        % gone.UUIDString())


# --------------------------------------------------------------------------
# the sweep: every procedure that names a domain
# --------------------------------------------------------------------------

CLASSES = {
    "domain": {"arg", "in-arg", "xml", "rename", "lookup-name", "lookup",
               "list-all", "stats-all", "list-ids", "list-defined",
               "num-active", "num-defined", "event", "event-cb", "refuse"},
    "network": {"arg", "xml", "lookup-name", "lookup", "list-all",
                "list-active", "list-defined", "num-active", "num-defined",
                "event-cb"},
    "storage_pool": {"arg", "xml", "lookup-name", "lookup", "lookup-vol",
                     "list-all", "list-active", "list-defined", "num-active",
                     "num-defined", "event-cb", "vol", "vol-lookup", "clone"},
}


def objects(row):
    """{family: class} of a procedures.tsv row."""
    if row["objects"] == "none":
        return {}
    return dict(p.split(":", 1) for p in row["objects"].split(","))


def test_objects_column_classifies_every_procedure():
    rows = _rows()
    assert len(rows) > 400
    for r in rows:
        for fam, cls in objects(r).items():
            assert cls in CLASSES[fam], r
    by = {r["name"]: objects(r) for r in rows if r["program"] == "REMOTE"}
    assert by["DOMAIN_GET_INFO"] == {"domain": "arg"}
    assert by["DOMAIN_SNAPSHOT_GET_XML_DESC"] == {"domain": "in-arg"}
    assert by["CONNECT_GET_ALL_DOMAIN_STATS"] == {"domain": "stats-all"}
    assert by["DOMAIN_MIGRATE_PREPARE3_PARAMS"] == {"domain": "refuse"}
    assert by["NETWORK_GET_DHCP_LEASES"] == {"domain": "refuse",
                                             "network": "arg"}
    assert by["STORAGE_VOL_GET_INFO"] == {"storage_pool": "vol"}
    assert by["CONNECT_GET_CAPABILITIES"] == {}


def test_sweep_every_domain_procedure_with_a_forbidden_domain(hv):
    """One raw call per procedure that takes a domain (or a snapshot or
    checkpoint of one), naming vault-1: none reaches libvirtd, each gets the
    driver's not-found error; every procedure refused for grants gets the
    access error."""
    vault = hv.direct.lookupByName("vault-1")
    ref = xdr_domain("vault-1", vault.UUID(), vault.ID())
    rows = [r for r in _rows() if objects(r).get("domain") in
            ("arg", "in-arg", "rename", "refuse")]
    assert len(rows) > 180, len(rows)
    want_msg = ("Domain not found: no domain with matching uuid '%s' (vault-1)"
                % vault.UUIDString())
    problems = []
    with RawClient(port=hv.port["tcp"], timeout=10.0) as rc:
        rc.handshake()
        mark = hv.tap.mark()
        for r in rows:
            prog = PROGRAMS[r["program"]]
            proc = int(r["number"])
            cls = objects(r)["domain"]
            if cls == "in-arg":
                payload = xdr_string("snap-1") + ref
            else:
                payload = ref
            payload += b"\0" * 64   # whatever follows is never read
            pkt = rc.call(proc, payload, prog=prog)
            if r["kind"] == "stream-create":
                # a refused stream has no serial: its data is dropped
                serial = rc.serial - 1
                rc.send_packet(prog, 1, proc, harness.TYPE_STREAM, serial,
                               harness.STATUS_CONTINUE, b"x" * 64)
            err = decode_error(pkt.payload) if pkt.status == STATUS_ERROR \
                else None
            if cls == "refuse":
                ok = err and (err["code"], err["domain"]) == (
                    VIR_ERR_ACCESS_DENIED, VIR_FROM_ACCESS) and \
                    r["name"] in err["message"]
            else:
                ok = err and (err["code"], err["domain"], err["message"]) == (
                    VIR_ERR_NO_DOMAIN, VIR_FROM_TEST, want_msg)
            if not ok:
                problems.append("%s %s: %r" % (r["program"], r["name"], err))
        # the session is still fine
        assert sorted(d["name"] for d in rc.list_all_domains()) \
            == sorted(GRANTED)
        end = hv.tap.mark()
    leaked = [f for f in hv.tap.since(mark)
              if f.seq < end and f.type == 0
              and f.proc != PROC["CONNECT_LIST_ALL_DOMAINS"]]
    assert not problems, "\n".join(problems)
    assert not leaked, ["%x/%d" % (f.prog, f.proc) for f in leaked]
    # vault-1 is untouched
    assert vault.isActive()


# --------------------------------------------------------------------------
# defining, creating, renaming
# --------------------------------------------------------------------------

def test_define_create_and_rename_respect_the_grant(hv):
    c = open_gw(hv)
    try:
        mark = hv.tap.mark()
        for fn in (lambda: c.defineXML(DOMAIN_XML % "vault-2"),
                   lambda: c.createXML(DOMAIN_XML % "vault-3"),
                   lambda: c.defineXML(DOMAIN_XML % "web-secret")):
            with pytest.raises(libvirt.libvirtError) as ei:
                fn()
            assert ei.value.get_error_code() == VIR_ERR_ACCESS_DENIED
            assert "outside this client's grant" in str(ei.value)
        assert not hv.tap.calls(mark, proc=PROC["DOMAIN_DEFINE_XML_FLAGS"])
        assert not hv.tap.calls(mark, proc=PROC["DOMAIN_DEFINE_XML"])
        assert not hv.tap.calls(mark, proc=PROC["DOMAIN_CREATE_XML"])
        names = [d.name() for d in hv.direct.listAllDomains()]
        assert "vault-2" not in names and "vault-3" not in names
        # a name the grant covers: defined, then usable through the handle
        # the define reply gave
        web3 = c.defineXML(DOMAIN_XML % "web-3")
        web3.create()
        assert web3.isActive()
        web3.destroy()
        # renaming it into a forbidden name is refused, into a granted one
        # works
        with pytest.raises(libvirt.libvirtError) as ei:
            web3.rename("vault-4")
        assert ei.value.get_error_code() == VIR_ERR_ACCESS_DENIED
        web3.rename("web-4")
        assert "web-4" in [d.name() for d in hv.direct.listAllDomains()]
        hv.direct.lookupByName("web-4").undefine()
        # XML whose name cannot be read unambiguously is refused
        with pytest.raises(libvirt.libvirtError) as ei:
            c.defineXML("<domain type='test'><name>web-<!-- x -->5</name>"
                        "<memory>8192</memory><os><type>hvm</type></os>"
                        "</domain>")
        assert ei.value.get_error_code() == VIR_ERR_ACCESS_DENIED
    finally:
        c.close()


def test_readonly_and_domain_grant_combine(hv):
    c = open_gw(hv, "ro")
    try:
        assert sorted(d.name() for d in c.listAllDomains()) == sorted(GRANTED)
        web1 = c.lookupByName("web-1")
        with pytest.raises(libvirt.libvirtError) as ei:
            web1.destroy()
        assert ei.value.get_error_code() == VIR_ERR_OPERATION_DENIED
        with pytest.raises(libvirt.libvirtError) as ei:
            c.lookupByName("vault-1")
        assert ei.value.get_error_code() == VIR_ERR_NO_DOMAIN
        assert web1.isActive()
    finally:
        c.close()


# --------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------

def test_events_about_other_domains_are_not_delivered(hv, event_clients):
    ec = event_clients()
    res = ec.open(hv.uri["tcp"], n=1)
    assert not res["errors"], res
    res_all = ec.open(hv.uri["all"], n=1)
    assert not res_all["errors"], res_all
    d = hv.direct
    for name in ("vault-1", "web-1", "web-secret"):
        dom = d.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.create()
    # the unrestricted subscriber saw all three (stop + start of two, start
    # of web-secret): wait for it, then compare
    deadline = time.monotonic() + harness.scaled(10.0)
    while time.monotonic() < deadline:
        evs = ec.events()["events"]
        if len({e[1] for e in evs[1]}) >= 3:
            break
        time.sleep(0.05)
    evs = ec.events()["events"]
    assert {e[1] for e in evs[1]} >= {"vault-1", "web-1", "web-secret"}, evs
    assert {e[1] for e in evs[0]} == {"web-1"}, evs
    # one upstream registration serves both
    st = hv.gw.status()
    assert st is not None
    d.lookupByName("web-secret").destroy()


def test_virsh_event_all_shows_only_granted_domains(hv):
    """virsh event --all through the grant while another identity (the
    unrestricted listener) defines and starts forbidden and granted
    domains."""
    import subprocess
    proc = subprocess.Popen(
        [harness.VIRSH, "-c", hv.uri["tcp"], "event", "--all", "--loop",
         "--timeout", "%d" % int(harness.scaled(6))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        time.sleep(harness.scaled(1.5))   # registered
        other = open_gw(hv, "all")
        try:
            for name in ("vault-9", "web-9"):
                dom = other.defineXML(DOMAIN_XML % name)
                dom.create()
                dom.destroy()
                dom.undefine()
        finally:
            other.close()
        out, err = proc.communicate(timeout=harness.scaled(20))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen = set(re.findall(r"for domain '?([\w-]+)'?", out))
    assert seen == {"web-9"}, (out, err)


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

@pytest.mark.parametrize("domains", [[], "web-*", [""], ["!"], [3]])
def test_check_config_rejects_bad_domains(virtmux_bin, domains):
    cfg = harness.make_config([harness.upstream_entry("hv1", "test:///default")],
                              default_upstream="hv1")
    cfg["policy"] = {"default": {"domains": domains}}
    r = harness.check_config(cfg, virtmux_bin)
    assert r.returncode != 0
    assert "policy.default.domains" in r.stderr, r.stderr


# --------------------------------------------------------------------------
# networks and storage pools
# --------------------------------------------------------------------------

NET_XML = "<network><name>%s</name><bridge name='%s'/></network>"
POOL_XML = ("<pool type='dir'><name>%s</name><target><path>/%s</path>"
            "</target></pool>")
VOL_XML = "<volume><name>%s</name><capacity>1048576</capacity></volume>"
VIR_ERR_NO_NETWORK = 43
VIR_ERR_NO_STORAGE_POOL = 49
VIR_ERR_NO_STORAGE_VOL = 50


@pytest.fixture
def objs(libvirtd, gateway, request):
    """Networks net-a (running), net-b, net-c (running); pools pool-a
    (running, volume va), pool-x (running, volume vx). The gateway's tcp
    listener grants networks ["net-a*", "net-c"] and storage_pools
    ["pool-a"]; the "all" listener everything."""
    d = call_with_timeout(libvirt.open, libvirtd.direct_uri)
    request.addfinalizer(d.close)
    for i, name in enumerate(("net-a", "net-b", "net-c")):
        n = d.networkDefineXML(NET_XML % (name, "vbr%d" % (20 + i)))
        if name != "net-b":
            n.create()
    for name, vol in (("pool-a", "va"), ("pool-x", "vx")):
        p = d.storagePoolDefineXML(POOL_XML % (name, name))
        p.create()
        p.createXML(VOL_XML % vol)
    tap = tapmod.Tap(libvirtd.port)
    request.addfinalizer(tap.stop)
    listeners = [{"name": n, "address": "127.0.0.1:%d" % harness.free_port(),
                  "auth": "none"} for n in ("tcp", "all")]
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", tap.uri())], default_upstream="hv1",
        listeners=listeners)
    cfg["policy"] = {"default": "deny", "rules": [
        {"match": {"listener": "tcp"}, "networks": ["net-a*", "net-c"],
         "storage_pools": ["pool-a"]},
        {"match": {"listener": "all"}},
    ]}
    gw = gateway(cfg)

    return harness.Endpoints(listeners, lvd=libvirtd, tap=tap, gw=gw,
                             direct=d)


def test_network_lists_lookups_and_handles(objs):
    o = objs
    c = call_with_timeout(libvirt.open, o.uri["tcp"])
    try:
        assert sorted(n.name() for n in c.listAllNetworks()) == ["net-a",
                                                                  "net-c"]
        assert sorted(c.listNetworks()) == ["net-a", "net-c"]
        assert c.listDefinedNetworks() == []
        assert c.numOfNetworks() == 2 and c.numOfDefinedNetworks() == 0
        out = virsh(o.uri["tcp"], "net-list", "--all", "--name")
        assert sorted(out.stdout.split()) == ["net-a", "net-c"], out
        want = direct_error(lambda: o.direct.networkLookupByName("nosuch"))
        with pytest.raises(libvirt.libvirtError) as ei:
            c.networkLookupByName("net-b")
        assert no_domain_error(ei.value) == (want[0], want[1], want[2].replace(
            "nosuch", "net-b"))
        netb = o.direct.networkLookupByName("net-b")
        with pytest.raises(libvirt.libvirtError) as ei:
            c.networkLookupByUUID(netb.UUID())
        assert ei.value.get_error_code() == VIR_ERR_NO_NETWORK
        assert c.networkLookupByName("net-a").bridgeName() == "vbr20"
        # define a forbidden one: refused before libvirtd sees it
        with pytest.raises(libvirt.libvirtError) as ei:
            c.networkDefineXML(NET_XML % ("net-z", "vbr29"))
        assert ei.value.get_error_code() == VIR_ERR_ACCESS_DENIED
        assert "net-z" not in [n.name() for n in o.direct.listAllNetworks()]
    finally:
        c.close()
    # a forged handle (net-b's name and UUID) and a foreign one (net-b's
    # UUID under a granted name) reach nothing
    with RawClient(port=o.port["tcp"], timeout=10.0) as rc:
        rc.handshake()
        mark = o.tap.mark()
        for name in ("net-b", "net-a"):
            pkt = rc.call(PROC["NETWORK_GET_XML_DESC"],
                          xdr_string(name) + netb.UUID() + xdr_u32(0))
            err = decode_error(pkt.payload)
            assert err["code"] == VIR_ERR_NO_NETWORK, err
        assert not o.tap.calls(mark, proc=PROC["NETWORK_GET_XML_DESC"])


def test_storage_pools_and_volumes(objs):
    o = objs
    c = call_with_timeout(libvirt.open, o.uri["tcp"])
    try:
        assert [p.name() for p in c.listAllStoragePools()] == ["pool-a"]
        assert c.listStoragePools() == ["pool-a"]
        assert c.numOfStoragePools() == 1
        pa = c.storagePoolLookupByName("pool-a")
        assert pa.listVolumes() == ["va"]
        va = pa.storageVolLookupByName("va")
        assert va.info()[1] == 1048576
        assert c.storageVolLookupByPath("/pool-a/va").name() == "va"
        want = direct_error(
            lambda: o.direct.storagePoolLookupByName("nosuch"))
        with pytest.raises(libvirt.libvirtError) as ei:
            c.storagePoolLookupByName("pool-x")
        assert no_domain_error(ei.value) == (want[0], want[1], want[2].replace(
            "nosuch", "pool-x"))
        # a volume of pool-x, by key and by path: "not found" as libvirtd
        # words a missing volume
        for fn, what in ((lambda: c.storageVolLookupByKey("/pool-x/vx"),
                          "key '/pool-x/vx'"),
                         (lambda: c.storageVolLookupByPath("/pool-x/vx"),
                          "path '/pool-x/vx'")):
            with pytest.raises(libvirt.libvirtError) as ei:
                fn()
            assert ei.value.get_error_code() == VIR_ERR_NO_STORAGE_VOL
            assert ei.value.get_error_message() == (
                "Storage volume not found: no storage vol with matching %s"
                % what)
    finally:
        c.close()
    # raw: a volume handle in pool-x, and pool-x's own handle
    px = o.direct.storagePoolLookupByName("pool-x")
    with RawClient(port=o.port["tcp"], timeout=10.0) as rc:
        rc.handshake()
        mark = o.tap.mark()
        vol = xdr_string("pool-x") + xdr_string("vx") + xdr_string("/pool-x/vx")
        pkt = rc.call(PROC["STORAGE_VOL_GET_INFO"], vol)
        err = decode_error(pkt.payload)
        assert (err["code"], err["message"]) == (
            VIR_ERR_NO_STORAGE_POOL, "Storage pool not found: no storage pool "
            "with matching name 'pool-x'")
        pkt = rc.call(PROC["STORAGE_POOL_GET_INFO"],
                      xdr_string("pool-x") + px.UUID())
        assert decode_error(pkt.payload)["code"] == VIR_ERR_NO_STORAGE_POOL
        assert not o.tap.calls(mark, proc=PROC["STORAGE_VOL_GET_INFO"])
        assert not o.tap.calls(mark, proc=PROC["STORAGE_POOL_GET_INFO"])


def test_sweep_network_and_pool_procedures(objs):
    """Every procedure that takes a network, a pool or a volume, naming the
    forbidden one: none reaches libvirtd, each gets "not found"."""
    o = objs
    netb = o.direct.networkLookupByName("net-b")
    px = o.direct.storagePoolLookupByName("pool-x")
    refs = {
        ("network", "arg"): (xdr_string("net-b") + netb.UUID(),
                             VIR_ERR_NO_NETWORK),
        ("storage_pool", "arg"): (xdr_string("pool-x") + px.UUID(),
                                  VIR_ERR_NO_STORAGE_POOL),
        ("storage_pool", "clone"): (xdr_string("pool-x") + px.UUID(),
                                    VIR_ERR_NO_STORAGE_POOL),
        ("storage_pool", "vol"): (xdr_string("pool-x") + xdr_string("vx")
                                  + xdr_string("/pool-x/vx"),
                                  VIR_ERR_NO_STORAGE_POOL),
        ("storage_pool", "lookup-vol"): (xdr_string("pool-x")
                                         + xdr_string("vx")
                                         + xdr_string("/pool-x/vx"),
                                         VIR_ERR_NO_STORAGE_POOL),
    }
    cases = []
    for r in _rows():
        for fam, cls in objects(r).items():
            if (fam, cls) in refs:
                cases.append((r, refs[(fam, cls)]))
    assert len(cases) > 25, len(cases)
    problems = []
    with RawClient(port=o.port["tcp"], timeout=10.0) as rc:
        rc.handshake()
        mark = o.tap.mark()
        for r, (payload, code) in cases:
            proc = int(r["number"])
            pkt = rc.call(proc, payload + b"\0" * 64)
            if r["kind"] == "stream-create":
                rc.send_packet(REMOTE_PROGRAM, 1, proc, harness.TYPE_STREAM,
                               rc.serial - 1, harness.STATUS_CONTINUE,
                               b"x" * 64)
            err = decode_error(pkt.payload) if pkt.status == STATUS_ERROR \
                else None
            # network calls that name domains are refused for domain grants
            # only: this grant limits networks, so they are "not found"
            if not err or err["code"] != code:
                problems.append("%s: %r" % (r["name"], err))
        end = o.tap.mark()
    leaked = [f for f in o.tap.since(mark) if f.seq < end and f.type == 0]
    assert not problems, "\n".join(problems)
    assert not leaked, [f.proc for f in leaked]
