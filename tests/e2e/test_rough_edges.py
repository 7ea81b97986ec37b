"""Rough edges a new user hits (issue "operations", part 6), each with its test.

* A second virtmux started with the same unix socket paths must refuse to start, not unlink
  the live sockets of the first; a socket left by a killed gateway is taken over.
* A queue timeout names no "(no error)", and /status shows no "no error" for a reachable
  upstream.
* Duplicate listener names or addresses are refused by --check-config (the unit test
  test_config.c covers the messages; here the real binary).
* routing.strict: a first path segment that is no upstream is a clear error naming the
  upstreams, not a driver error from default_upstream; --check-config warns about upstream
  names that ordinary libvirt URIs use as paths.
* Accurate messages: a web URL and a remote URI without a transport as upstreams, a missing
  config file, unreadable TLS and SASL files (with the reason, also on a SIGHUP reload).
"""

import os
import signal
import subprocess

import pytest

import harness
from harness import wait_until


def unix_config(lvd, tmp_path, sock="gw.sock", admin="admin.sock"):
    return harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri)], default_upstream="hv1",
        listeners=[{"name": "local", "unix": str(tmp_path / sock), "auth": "none"}],
        admin={"unix": str(tmp_path / admin)})


def started_alone(gw):
    """Start `gw`; True if it is running afterwards. (Its readiness probe may be answered
    by the first gateway's socket, so what counts is whether the process stays up.)"""
    try:
        gw.start()
    except harness.HarnessError:
        return False
    return wait_until(lambda: not gw.running(), 2.0) is False


def handshake_over(path):
    with harness.RawClient(unix=path) as c:
        c.handshake()
        return c.list_all_domains()


def assert_refused(config, what):
    """A gateway started with `config` must not come up: its socket is another's."""
    other = harness.Virtmux(config)
    try:
        assert not started_alone(other), "a second gateway took a live %s" % what
        assert "another process is listening on it" in other.log_text()
    finally:
        other.stop()
        other.cleanup()


def test_second_gateway_does_not_take_live_sockets(shared_libvirtd, gateway, tmp_path):
    first = gateway(unix_config(shared_libvirtd, tmp_path))
    sock = str(tmp_path / "gw.sock")
    assert handshake_over(sock)
    # same listener socket: refused, and the first one's socket still answers
    assert_refused(unix_config(shared_libvirtd, tmp_path, admin="other.sock"), "socket")
    assert os.path.exists(sock)
    assert handshake_over(sock)
    # same admin socket: refused too
    assert_refused(unix_config(shared_libvirtd, tmp_path, sock="other.sock"), "admin socket")
    assert os.path.exists(str(tmp_path / "admin.sock"))
    assert first.running()


def test_socket_of_a_killed_gateway_is_taken_over(shared_libvirtd, gateway, tmp_path):
    first = gateway(unix_config(shared_libvirtd, tmp_path))
    sock = str(tmp_path / "gw.sock")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    first.returncode = -9
    assert os.path.exists(sock)             # left behind, nobody listening
    second = gateway(unix_config(shared_libvirtd, tmp_path))
    assert second.running()
    assert handshake_over(sock)


def test_status_has_no_error_for_a_reachable_upstream(shared_libvirtd, gateway):
    cfg = harness.make_config([harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
                              default_upstream="hv1", admin=True)
    gw = gateway(cfg)
    with harness.RawClient(port=gw.port) as c:
        c.handshake()
        assert c.list_all_domains()
        pools = gw.status()["pools"]
        assert pools and pools[0]["last_error"] is None, pools


def test_check_config_refuses_duplicate_listeners(tmp_path):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", "test+tcp://127.0.0.1:1/default")],
        listeners=[{"name": "a", "address": "127.0.0.1:16599"},
                   {"name": "a", "address": "127.0.0.1:16599"}])
    r = harness.check_config(cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "listeners[1].name: \"a\" is already used by listeners[0]" in out
    assert "listeners[1].address: \"127.0.0.1:16599\" is already used by listeners[0]" in out


def test_logs_name_procedures_and_warn_of_an_unreachable_upstream(gateway):
    port = harness.free_port()          # nothing listens there
    gw = gateway.single("test+tcp://127.0.0.1:%d/default" % port)
    with harness.RawClient(port=gw.port) as c:
        c.auth_list()
        # a call before OPEN is answered with an error; the debug line names it
        p = c.call(harness.PROC_CONNECT_LIST_ALL_DOMAINS, harness.xdr_i32(1) + harness.xdr_u32(0))
        assert p.status == harness.STATUS_ERROR
        assert c.connect_open().status == harness.STATUS_ERROR  # upstream unreachable
    assert wait_until(lambda: "cannot connect" in gw.log_text(), 5)
    log = gw.log_text()
    assert "CONNECT_LIST_ALL_DOMAINS serial" in log, log[-2000:]
    assert "proc 273" not in log
    lines = [ln for ln in log.splitlines() if "cannot connect" in ln]
    assert lines and all(" warn " in ln for ln in lines), lines


# --------------------------------------------------------------------------
# routing.strict and names that capture ordinary URIs
# --------------------------------------------------------------------------

def strict_config(lvd, strict):
    cfg = harness.make_config([harness.upstream_entry("hv1", lvd.direct_uri),
                               harness.upstream_entry("lab", lvd.direct_uri)],
                              default_upstream="hv1")
    if strict is not None:
        cfg["routing"] = {"strict": strict}
    return cfg


def test_routing_strict_names_the_upstreams(shared_libvirtd, gateway):
    import libvirt
    gw = gateway(strict_config(shared_libvirtd, True))
    for path in ("hv9/default", "default"):        # a typo, and an ordinary path
        r = harness.virsh(gw.uri(path), "list", "--all")
        assert r.returncode == 1
        assert 'no upstream "%s"' % path.split("/")[0] in r.stderr, r.stderr
        assert "routing is strict" in r.stderr and "hv1, lab" in r.stderr, r.stderr
        with pytest.raises(libvirt.libvirtError) as ei:
            harness.call_with_timeout(libvirt.open, gw.uri(path))
        assert ei.value.get_error_code() == harness.VIR_ERR_NO_CONNECT
    for path in ("hv1/default", "lab/default"):
        r = harness.virsh(gw.uri(path), "list", "--all", "--name")
        assert r.returncode == 0 and "test" in r.stdout, r.stderr


def test_routing_not_strict_by_default(shared_libvirtd, gateway):
    gw = gateway(strict_config(shared_libvirtd, None))
    r = harness.virsh(gw.uri("default"), "list", "--all", "--name")
    assert r.returncode == 0 and "test" in r.stdout, r.stderr
    r = harness.virsh(gw.uri("hv9/default"), "list", "--all")
    assert "routing is strict" not in r.stderr      # went to default_upstream, as before


def test_routing_strict_must_be_a_bool(tmp_path):
    cfg = strict_config_stub()
    cfg["routing"] = {"strict": "yes"}
    r = harness.check_config(cfg)
    assert r.returncode == 1 and "routing.strict: must be true or false" in r.stderr, r.stderr
    cfg["routing"] = {"strikt": True}
    r = harness.check_config(cfg)
    assert r.returncode == 1 and "routing.strikt: unknown key" in r.stderr, r.stderr


def strict_config_stub(*names):
    return harness.make_config(
        [harness.upstream_entry(n, "test+tcp://127.0.0.1:1/default") for n in names or ("hv1",)],
        listeners=[{"address": "127.0.0.1:16599"}])


def test_check_config_warns_about_upstreams_named_like_paths():
    r = harness.check_config(strict_config_stub("hv1", "system", "default"))
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, r.stderr
    assert 'upstreams[1].name: "system" is also a path segment' in warnings[0]
    assert "qemu:///system" in warnings[0]
    assert 'upstreams[2].name: "default"' in warnings[1] and "test:///default" in warnings[1]
    r = harness.check_config(strict_config_stub("hv1", "lab"))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


# --------------------------------------------------------------------------
# messages that say what is wrong
# --------------------------------------------------------------------------

def test_upstream_uri_messages_are_accurate():
    cases = {
        "http://h:1/x": ['unsupported transport: "http" is no libvirt driver',
                         "DRIVER+tcp://"],
        "qemu://host/system": ["a remote host needs a transport: qemu+tcp://host/system",
                               "qemu+tls://"],
        "qemu+ssh://host/system": ['unsupported transport "ssh"'],
        "qemu+unix://host/system": ['a unix URI takes no host ("host")'],
    }
    for uri, wants in cases.items():
        cfg = strict_config_stub()
        cfg["upstreams"][0]["uri"] = uri
        r = harness.check_config(cfg)
        assert r.returncode == 1, (uri, r.stderr)
        for want in wants:
            assert "upstreams[0].uri: " in r.stderr and want in r.stderr, (uri, r.stderr)


def test_missing_config_file_says_so(tmp_path):
    missing = str(tmp_path / "missing.json")
    r = subprocess.run([str(harness.virtmux_binary()), "--check-config", missing],
                       capture_output=True, text=True, timeout=harness.scaled(10),
                       env=harness.sanitizer_env())
    assert r.returncode == 1
    assert "cannot open config file %s: No such file or directory" % missing in r.stderr, \
        r.stderr
    assert ":-1:-1" not in r.stderr


def test_unreadable_tls_and_sasl_files_give_the_reason(tmp_path):
    cfg = strict_config_stub()
    cfg["listeners"] = [{"address": "127.0.0.1:16599", "auth": "tls",
                         "tls": {"cert": str(tmp_path / "nocert.pem"),
                                 "key": str(tmp_path / "nokey.pem"),
                                 "ca": str(tmp_path / "noca.pem")}},
                        {"address": "127.0.0.1:16598", "auth": "sasl"}]
    cfg["sasl"] = {"sasldb": str(tmp_path / "no.db"), "keytab": str(tmp_path / "no.keytab")}
    r = harness.check_config(cfg)
    assert r.returncode == 1
    for key, name in (("listeners[0].tls.cert", "nocert.pem"),
                      ("listeners[0].tls.key", "nokey.pem"),
                      ("listeners[0].tls.ca", "noca.pem"), ("sasl.sasldb", "no.db"),
                      ("sasl.keytab", "no.keytab")):
        want = '%s: cannot read "%s": No such file or directory' % (key, tmp_path / name)
        assert want in r.stderr, r.stderr


def test_tls_reload_failure_gives_the_reason(shared_libvirtd, gateway, tmp_path):
    import pki
    ca = pki.Pki(str(tmp_path / "ca"))
    server = ca.server("localhost")
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)], default_upstream="hv1",
        listeners=[{"name": "tls", "address": "127.0.0.1:%d" % harness.free_port(),
                    "tls": {"cert": server.cert, "key": server.key, "ca": ca.ca_cert}}])
    gw = gateway(cfg)
    os.rename(server.cert, server.cert + ".gone")
    gw.proc.send_signal(signal.SIGHUP)
    # SIGHUP re-reads the whole configuration: the file it cannot read is named with the
    # reason, and the running configuration (old certificates included) stays
    want = 'listeners[0].tls.cert: cannot read "%s": No such file or directory' % server.cert
    assert wait_until(lambda: want in gw.log_text(), harness.scaled(5)), gw.log_text()[-1500:]
    assert "reload refused: %s is invalid; keeping the running configuration" \
        % gw.config_path in gw.log_text()
    assert gw.running()
