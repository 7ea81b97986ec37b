"""Rough edges a new user hits (issue "operations", part 6), each with its test.

* A second virtmux started with the same unix socket paths must refuse to start, not unlink
  the live sockets of the first; a socket left by a killed gateway is taken over.
* A queue timeout names no "(no error)", and /status shows no "no error" for a reachable
  upstream.
* Duplicate listener names or addresses are refused by --check-config (the unit test
  test_config.c covers the messages; here the real binary).
"""

import os
import signal

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
