"""virsh through the gateway must print exactly what it prints when talking
to libvirtd directly."""

import os
import re
import tempfile

import libvirt
import pytest

from harness import virsh

DOMAIN_XML = ("<domain type='test'><name>%s</name><memory>65536</memory>"
              "<os><type>hvm</type></os></domain>")


@pytest.fixture(scope="module")
def setup(shared_libvirtd, module_gateway_factory):
    lvd = shared_libvirtd
    # The test driver forgets defined objects when its last connection
    # closes; keep one open so state survives between virsh runs.
    keeper = libvirt.open(lvd.direct_uri)
    gw = module_gateway_factory.single(
        lvd.direct_uri,
        pool={"max_connections": 4, "max_inflight": 4, "idle_timeout_s": 60})
    yield lvd, gw
    try:
        keeper.close()
    except libvirt.libvirtError:
        pass


def normalise(text):
    # the test driver reports wall-clock time as CPU time
    return re.sub(r"(CPU time:\s+)\S+", r"\1<t>", text)


def run_both(setup, *args, readonly=False):
    lvd, gw = setup
    via = virsh(gw.uri(), *args, readonly=readonly)
    direct = virsh(lvd.direct_uri, *args, readonly=readonly)
    return via, direct


def assert_same(via, direct):
    assert via.returncode == direct.returncode, (via.stderr, direct.stderr)
    assert normalise(via.stdout) == normalise(direct.stdout)
    assert via.stderr == direct.stderr


@pytest.mark.parametrize("args", [
    ["list", "--all"],
    ["list", "--all", "--name"],
    ["dominfo", "test"],
    ["domstate", "test"],
    ["dumpxml", "test"],
    ["net-list", "--all"],
    ["net-dumpxml", "default"],
    ["pool-list", "--all"],
    ["pool-dumpxml", "default-pool"],
    ["vol-list", "default-pool"],
    ["iface-list", "--all"],
    ["capabilities"],
    ["nodeinfo"],
    ["version"],
    ["hostname"],
    ["sysinfo"],
    ["dominfo", "no-such-domain"],
], ids=lambda a: " ".join(a))
def test_same_output(setup, args):
    via, direct = run_both(setup, *args)
    assert_same(via, direct)


@pytest.mark.parametrize("args", [
    ["list", "--all"],
    ["dominfo", "test"],
    ["net-list", "--all"],
], ids=lambda a: " ".join(a))
def test_same_output_readonly(setup, args):
    via, direct = run_both(setup, *args, readonly=True)
    assert_same(via, direct)


def test_uri_is_the_clients_own(setup):
    _, gw = setup
    r = virsh(gw.uri(), "uri")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == gw.uri()


def test_error_message_passes_through(setup):
    via, direct = run_both(setup, "domstate", "nope")
    assert via.returncode == 1
    assert "nope" in via.stderr
    assert_same(via, direct)


def _lifecycle(uri, name, xml_path):
    steps = [
        ["define", xml_path],
        ["domstate", name],
        ["list", "--all", "--name"],
        ["start", name],
        ["domstate", name],
        ["dominfo", name],
        ["destroy", name],
        ["domstate", name],
        ["undefine", name],
        ["list", "--all", "--name"],
        ["domstate", name],
    ]
    out = []
    for step in steps:
        r = virsh(uri, *step)
        text = normalise(r.stdout)
        # ids and the generated UUID legitimately differ between two runs
        text = re.sub(r"(?m)^(Id:\s+)\S+", r"\1<id>", text)
        text = re.sub(r"(?m)^(UUID:\s+)\S+", r"\1<uuid>", text)
        out.append((step[0], r.returncode, text, r.stderr))
    return out


def test_define_start_destroy_undefine(setup):
    lvd, gw = setup
    tmp = tempfile.mkdtemp(prefix="virtmux-xml-")
    paths = {}
    for name in ("vm1", "vm2"):
        paths[name] = os.path.join(tmp, "%s.xml" % name)
        with open(paths[name], "w") as f:
            f.write(DOMAIN_XML % name)
    try:
        via = _lifecycle(gw.uri(), "vm1", paths["vm1"])
        direct = _lifecycle(lvd.direct_uri, "vm2", paths["vm2"])
    finally:
        for p in paths.values():
            os.unlink(p)
        os.rmdir(tmp)

    # sanity: the sequence really did what we think
    assert via[0][1] == 0 and "vm1" in via[0][2]
    assert via[3][1] == 0 and via[4][2].strip() == "running"
    assert via[7][2].strip() == "shut off"
    assert via[-1][1] == 1                      # gone after undefine

    def subst(rows):
        return [(s, rc, o.replace("vm2", "vm1"), e.replace("vm2", "vm1"))
                for s, rc, o, e in rows]
    assert via == subst(direct)


def test_domain_defined_via_gateway_is_visible_directly(setup):
    lvd, gw = setup
    conn_gw = libvirt.open(gw.uri())
    try:
        dom = conn_gw.defineXML(DOMAIN_XML % "vm3")
        try:
            r = virsh(lvd.direct_uri, "domstate", "vm3")
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "shut off"
        finally:
            dom.undefine()
        r = virsh(lvd.direct_uri, "domstate", "vm3")
        assert r.returncode == 1
    finally:
        conn_gw.close()


def test_readonly_client_is_refused_writes(setup):
    lvd, gw = setup
    r = virsh(gw.uri(), "destroy", "test", readonly=True)
    assert r.returncode == 1
    assert "read only" in r.stderr or "forbidden" in r.stderr
    r = virsh(lvd.direct_uri, "domstate", "test")
    assert r.stdout.strip() == "running"
