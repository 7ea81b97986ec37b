"""process.user / process.group: the gateway binds its listeners and reads
its keys as root, then runs as an unprivileged user for good. Files it reads
again later (sasldb at each login, upstream password files) must be readable
by that user, or it refuses to start."""

import grp
import os
import pwd
import shutil
import tempfile

import pytest

import harness
import pki

USER = "nobody"


def ids(pid):
    """{'Uid': [...], 'Gid': [...], 'Groups': [...]} from /proc/PID/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = [int(v) for v in value.split()]
    return out


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="virtmux-privs-")
    os.chmod(d, 0o755)      # the dropped user must reach the files inside
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(d, upstream_uri, sasldb, **process):
    return harness.make_config(
        [harness.upstream_entry("hv1", upstream_uri)], default_upstream="hv1",
        listeners=[
            {"name": "tcp", "address": "127.0.0.1:%d" % harness.free_port()},
            {"name": "local", "unix": os.path.join(d, "gw.sock")},
            {"name": "sasl", "address": "127.0.0.1:%d" % harness.free_port(),
             "auth": "sasl"}],
        sasl={"sasldb": sasldb, "mechanisms": ["digest-md5"]},
        process=dict(process or {"user": USER}))


def test_runs_as_the_configured_user(workdir, shared_libvirtd, gateway):
    nobody = pwd.getpwnam(USER)
    sasldb = pki.make_sasldb(os.path.join(workdir, "gw.sasldb"),
                             {"alice": "secret"})
    os.chown(sasldb, 0, nobody.pw_gid)
    os.chmod(sasldb, 0o640)   # root's file, readable by the service's group
    authfile = pki.write_authfile(os.path.join(workdir, "alice.auth"),
                                  "alice", "secret")
    gw = gateway(config(workdir, shared_libvirtd.direct_uri, sasldb))
    got = ids(gw.proc.pid)
    assert got["Uid"] == [nobody.pw_uid] * 4, got
    assert got["Gid"] == [nobody.pw_gid] * 4, got
    assert set(got["Groups"]) <= {nobody.pw_gid}, got
    assert "privileges dropped: running as user nobody (uid %d)" \
        % nobody.pw_uid in gw.log_text()
    # the sockets bound as root serve as before
    r = harness.virsh(gw.uri(), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
    r = harness.virsh(gw.unix_uri(0), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
    # cyrus-sasl opens the sasldb again for this login, as nobody
    port = harness.split_address(gw.config["listeners"][2]["address"])[1]
    r = harness.virsh("test+tcp://127.0.0.1:%d/default?authfile=%s"
                      % (port, authfile), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr
    assert "authenticated (sasl) as alice@sasl" in gw.log_text()


def test_explicit_group(workdir, shared_libvirtd, gateway):
    nobody = pwd.getpwnam(USER)
    group = "daemon"          # not nobody's primary group
    gid = grp.getgrnam(group).gr_gid
    sasldb = pki.make_sasldb(os.path.join(workdir, "gw.sasldb"),
                             {"alice": "secret"})
    os.chown(sasldb, 0, gid)
    os.chmod(sasldb, 0o640)
    gw = gateway(config(workdir, shared_libvirtd.direct_uri, sasldb,
                        user=USER, group=group))
    got = ids(gw.proc.pid)
    assert got["Uid"] == [nobody.pw_uid] * 4, got
    assert got["Gid"] == [gid] * 4, got
    r = harness.virsh(gw.uri(), "list", "--name")
    assert r.returncode == 0 and r.stdout.split() == ["test"], r.stderr


@pytest.mark.parametrize("kind", ["sasldb", "password_file"])
def test_file_the_user_cannot_read_refuses_start(workdir, shared_libvirtd,
                                                 virtmux_bin, kind):
    """A secret only root can read would fail at the first login after the
    drop: the gateway says so at start instead, and exits 1."""
    sasldb = pki.make_sasldb(os.path.join(workdir, "gw.sasldb"),
                             {"alice": "secret"})
    cfg = config(workdir, shared_libvirtd.direct_uri, sasldb)
    if kind == "sasldb":
        where, secret = "sasl.sasldb", sasldb
    else:
        os.chown(sasldb, 0, pwd.getpwnam(USER).pw_gid)
        os.chmod(sasldb, 0o640)   # the sasldb is fine: only the password file fails
        secret = pki.write_password_file(os.path.join(workdir, "pw"), "pw")
        cfg["upstreams"][0]["sasl"] = {"username": "gw",
                                       "password_file": secret}
        where = "upstreams[0].sasl.password_file"
    gw = harness.Virtmux(cfg, binary=virtmux_bin)
    try:
        with pytest.raises(harness.HarnessError) as e:
            gw.start()
        assert "exited with 1" in str(e.value)
        assert '%s: user nobody cannot read "%s"' % (where, secret) \
            in gw.log_text()
    finally:
        gw.cleanup()


def test_unknown_user_or_group_is_a_config_error(virtmux_bin, workdir):
    base = {"listeners": [{"address": "127.0.0.1:1"}],
            "upstreams": [{"name": "a", "uri": "test+tcp://127.0.0.1:1/default"}]}
    r = harness.check_config(dict(base, process={"user": "no-such-user-vm"}),
                             binary=virtmux_bin)
    assert r.returncode == 1
    assert 'process.user: no user "no-such-user-vm"' in r.stderr, r.stderr
    r = harness.check_config(dict(base, process={"user": USER,
                                                 "group": "no-such-group-vm"}),
                             binary=virtmux_bin)
    assert r.returncode == 1
    assert 'process.group: no group "no-such-group-vm"' in r.stderr, r.stderr
    r = harness.check_config(dict(base, process={"group": "daemon"}),
                             binary=virtmux_bin)
    assert r.returncode == 1
    assert "process.group: needs process.user" in r.stderr, r.stderr
    r = harness.check_config(dict(base, process={"user": USER}),
                             binary=virtmux_bin)
    assert r.returncode == 0, r.stderr
