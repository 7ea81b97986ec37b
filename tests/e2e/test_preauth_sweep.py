"""Before authentication nothing is forwarded.

From an unauthenticated session on an ``auth: "sasl"`` listener, every
procedure of the REMOTE, QEMU and LXC programs in data/procedures.tsv is sent
as a CALL with empty arguments. Only AUTH_LIST and the SASL procedures are
answered as such; every other call gets REPLY/ERROR code 39 (VIR_ERR_RPC),
domain 7 (VIR_FROM_RPC), "authentication required". AUTH_SASL_START/STEP
without INIT and AUTH_POLKIT get an authentication error (45).

The proof that nothing reached libvirtd: the gateway's upstream goes through a
counting relay to a libvirtd of its own; the relay relayed no connection and
virt-admin reports 0 clients after the sweep, while one authenticated client
afterwards makes both 1.
"""

import os
import shutil
import tempfile

import libvirt
import pytest

import harness
import pki
from harness import (KEEPALIVE_PROGRAM, KEEPALIVE_VERSION, PROC_KEEPALIVE_PING,
                     PROC_KEEPALIVE_PONG, REMOTE_VERSION, STATUS_ERROR,
                     STATUS_OK, TYPE_MESSAGE, TYPE_REPLY, RawClient,
                     XdrReader, decode_error)

PROGRAMS = {"REMOTE": 0x20008086, "QEMU": 0x20008087, "LXC": 0x00068000}
VIR_ERR_RPC = 39
VIR_ERR_AUTH_FAILED = 45
VIR_FROM_RPC = 7
AUTH_LIST, SASL_INIT, SASL_START, SASL_STEP, POLKIT = 66, 67, 68, 69, 70


def procedures():
    """[(program, number, name)] from data/procedures.tsv."""
    path = harness.REPO_ROOT / "data" / "procedures.tsv"
    out = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header[:3] == ["program", "number", "name"], header
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 3 and fields[0] in PROGRAMS:
                out.append((fields[0], int(fields[1]), fields[2]))
    return out


def test_procedure_table_is_complete():
    procs = procedures()
    progs = {p for p, _, _ in procs}
    assert progs == set(PROGRAMS)
    assert len([p for p in procs if p[0] == "REMOTE"]) > 400
    names = {(p, n): name for p, n, name in procs}
    assert names[("REMOTE", AUTH_LIST)] == "AUTH_LIST"
    assert names[("REMOTE", POLKIT)] == "AUTH_POLKIT"


@pytest.fixture
def sweep_env(request, libvirtd, gateway, tmp_path):
    """libvirtd <- counting relay <- gateway (SASL listeners, TCP and
    unix)."""
    db = pki.make_sasldb(str(tmp_path / "gw.sasldb"), {"alice": "secret"})
    relay = pki.TcpRelay(libvirtd.port)
    request.addfinalizer(relay.close)
    sockdir = tempfile.mkdtemp(prefix="virtmux-sock-")
    request.addfinalizer(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    sock = os.path.join(sockdir, "gw.sock")
    listeners = [
        {"name": "tcpsasl", "address": "127.0.0.1:%d" % harness.free_port(),
         "auth": "sasl"},
        {"name": "unixsasl", "unix": sock, "auth": "sasl"},
    ]
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", "test+tcp://127.0.0.1:%d/default"
                                % relay.port)],
        default_upstream="hv1", listeners=listeners, admin=True,
        sasl={"sasldb": db, "mechanisms": ["scram-sha-256", "digest-md5"],
              "max_failures": 100000})
    gw = gateway(cfg)
    assert harness.wait_until(lambda: libvirtd.nclients() == 0, 5.0)
    assert relay.accepted == 0
    return {"gw": gw, "relay": relay, "lvd": libvirtd, "sock": sock,
            "authfile": pki.write_authfile(str(tmp_path / "a.auth"), "alice",
                                           "secret")}


def raw_client(env, transport):
    if transport == "tcp":
        return RawClient(port=env["gw"].port, timeout=5.0)
    return RawClient(unix=env["sock"], timeout=5.0)


def expect_error(pkt, prog, proc, serial):
    assert (pkt.type, pkt.prog, pkt.proc, pkt.serial) == \
        (TYPE_REPLY, prog, proc, serial), pkt[:7]
    assert pkt.status == STATUS_ERROR, pkt[:7]
    return decode_error(pkt.payload)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_nothing_before_authentication(sweep_env, transport):
    gw, relay, lvd = sweep_env["gw"], sweep_env["relay"], sweep_env["lvd"]
    before = lvd.nclients()
    assert before == 0
    wrong = []
    answered = 0
    with raw_client(sweep_env, transport) as c:
        # keepalive is answered before authentication
        c.send_packet(KEEPALIVE_PROGRAM, KEEPALIVE_VERSION,
                      PROC_KEEPALIVE_PING, TYPE_MESSAGE, 0)
        pong = c.recv_packet()
        assert (pong.prog, pong.proc, pong.type) == \
            (KEEPALIVE_PROGRAM, PROC_KEEPALIVE_PONG, TYPE_MESSAGE)

        for prog_name, num, name in procedures():
            if (prog_name, num) == ("REMOTE", SASL_INIT):
                continue            # START/STEP are checked without INIT
            prog = PROGRAMS[prog_name]
            serial = c.next_serial()
            c.send_packet(prog, REMOTE_VERSION, num, 0, serial)
            pkt = c.recv_packet()
            answered += 1
            got = None
            if (prog_name, num) == ("REMOTE", AUTH_LIST):
                if pkt.status != STATUS_OK:
                    got = ("error", decode_error(pkt.payload))
                else:
                    r = XdrReader(pkt.payload)
                    types = [r.i32() for _ in range(r.u32())]
                    if types != [1]:                  # REMOTE_AUTH_SASL
                        got = ("auth types", types)
                if got:
                    wrong.append((prog_name, num, name, got))
                continue
            err = expect_error(pkt, prog, num, serial)
            if (prog_name, num) in (("REMOTE", SASL_START),
                                    ("REMOTE", SASL_STEP),
                                    ("REMOTE", POLKIT)):
                ok = (err["code"] == VIR_ERR_AUTH_FAILED
                      and err["domain"] == VIR_FROM_RPC
                      and "authentication failed" in (err["message"] or ""))
            else:
                ok = (err["code"] == VIR_ERR_RPC
                      and err["domain"] == VIR_FROM_RPC
                      and err["message"] == "authentication required")
            if not ok:
                wrong.append((prog_name, num, name,
                              (err["code"], err["domain"], err["message"])))
        # the session is still there and still unauthenticated
        pkt = c.call(1, harness.xdr_opt_string("test:///default")
                     + harness.xdr_u32(0))
        err = expect_error(pkt, PROGRAMS["REMOTE"], 1, pkt.serial)
        assert (err["code"], err["message"]) == (VIR_ERR_RPC,
                                                 "authentication required")
    assert wrong == [], "%d of %d answered wrongly, e.g. %r" % (
        len(wrong), answered, wrong[:10])
    assert answered == len(procedures()) - 1

    # AUTH_SASL_INIT on a fresh session lists the mechanisms
    with raw_client(sweep_env, transport) as c:
        pkt = c.call(SASL_INIT)
        assert pkt.status == STATUS_OK, decode_error(pkt.payload)
        mechs = XdrReader(pkt.payload).string().split(",")
        want = {"DIGEST-MD5"} if transport == "tcp" else \
            {"DIGEST-MD5", "SCRAM-SHA-256"}
        assert set(mechs) == want, mechs

    # nothing reached libvirtd: the gateway never even connected
    assert relay.accepted == 0
    assert lvd.nclients() == 0
    assert "connecting to" not in gw.log_text()

    # the measurement is live: one authenticated client connects upstream
    uri = ("test+tcp://127.0.0.1:%d/default?authfile=%s"
           % (gw.port, sweep_env["authfile"]) if transport == "tcp" else
           "test+unix:///default?socket=%s&authfile=%s"
           % (sweep_env["sock"], sweep_env["authfile"]))
    r = harness.virsh(uri, "list")
    assert r.returncode == 0, r.stderr
    assert relay.accepted == 1
    assert lvd.nclients() == 1
    assert gw.running()


def test_failed_authentication_does_not_open_the_gate(sweep_env):
    """After a failed SASL attempt the session is still unauthenticated:
    calls keep getting "authentication required"; still nothing upstream."""
    gw, relay, lvd = sweep_env["gw"], sweep_env["relay"], sweep_env["lvd"]
    with raw_client(sweep_env, "tcp") as c:
        assert c.auth_list() == [1]
        assert c.call(SASL_INIT).status == STATUS_OK
        # a START with a mechanism that is not offered fails
        args = (harness.xdr_string("PLAIN") + harness.xdr_i32(0)
                + harness.xdr_u32(4) + b"".join(harness.xdr_u32(b)
                                                 for b in b"\0a\0b"))
        err = expect_error(c.call(SASL_START, args), PROGRAMS["REMOTE"],
                           SASL_START, c.serial - 1)
        assert err["code"] == VIR_ERR_AUTH_FAILED, err
        for proc in (1, 273, 16, 60):
            pkt = c.call(proc)
            err = expect_error(pkt, PROGRAMS["REMOTE"], proc, pkt.serial)
            assert (err["code"], err["message"]) == \
                (VIR_ERR_RPC, "authentication required"), (proc, err)
    with pytest.raises(libvirt.libvirtError) as ei:
        harness.call_with_timeout(
            libvirt.openAuth, "test+tcp://127.0.0.1:%d/default" % gw.port,
            pki.auth_callback("alice", "wrong"), 0)
    assert ei.value.get_error_code() == libvirt.VIR_ERR_AUTH_FAILED
    assert relay.accepted == 0
    assert lvd.nclients() == 0
