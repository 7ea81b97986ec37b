"""virtmux --check-config and the process life cycle."""

import copy
import os
import signal
import subprocess
import tempfile
import time

import libvirt
import pytest

import harness
from harness import check_config, virsh

VALID = {
    "listeners": [
        {"name": "tcp", "address": "127.0.0.1:16509", "auth": "none"},
        {"name": "local", "unix": "/run/virtmux/libvirt-sock",
         "mode": "0666", "auth": "none", "upstream": "hv1"},
    ],
    "upstreams": [
        {"name": "hv1", "uri": "test+tcp://127.0.0.1:26509/default",
         "pool": {"max_connections": 4, "max_inflight": 4,
                  "idle_timeout_s": 60}},
        {"name": "hv2",
         "uri": "test+unix:///default?socket=/tmp/x/run/libvirt-sock"},
    ],
    "default_upstream": "hv1",
    "limits": {"max_clients": 10000, "queue_timeout_ms": 30000,
               "max_client_requests": 16},
    "keepalive": {"interval_s": 5, "count": 5},
}


def variant(mutate):
    cfg = copy.deepcopy(VALID)
    mutate(cfg)
    return cfg


def test_valid_config(virtmux_bin):
    r = check_config(VALID, binary=virtmux_bin)
    assert r.returncode == 0, r.stderr


def test_minimal_config(virtmux_bin):
    cfg = {"listeners": [{"name": "tcp", "address": "127.0.0.1:16509",
                          "auth": "none"}],
           "upstreams": [{"name": "a",
                          "uri": "qemu+tcp://127.0.0.1:26509/system"}],
           "default_upstream": "a"}
    r = check_config(cfg, binary=virtmux_bin)
    assert r.returncode == 0, r.stderr


def _ssh(cfg):
    cfg["upstreams"][0]["uri"] = "qemu+ssh://root@hv1/system"


def _ssh_second(cfg):
    cfg["upstreams"][1]["uri"] = "qemu+ssh://root@hv2/system"


def _no_listeners(cfg):
    del cfg["listeners"]


def _no_upstreams(cfg):
    del cfg["upstreams"]
    del cfg["default_upstream"]
    del cfg["listeners"][1]["upstream"]


def _bad_default(cfg):
    cfg["default_upstream"] = "nowhere"


def _bad_listener_upstream(cfg):
    cfg["listeners"][1]["upstream"] = "nowhere"


def _uri_not_a_string(cfg):
    cfg["upstreams"][0]["uri"] = 42


def _bad_address(cfg):
    cfg["listeners"][0]["address"] = "127.0.0.1:99999"


@pytest.mark.parametrize("mutate,path", [
    (_ssh, "upstreams[0].uri"),
    (_ssh_second, "upstreams[1].uri"),
    (_no_listeners, "listeners"),
    (_no_upstreams, "upstreams"),
    (_bad_default, "default_upstream"),
    (_bad_listener_upstream, "listeners[1].upstream"),
    (_uri_not_a_string, "upstreams[0].uri"),
    (_bad_address, "listeners[0].address"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_invalid_config_names_the_path(virtmux_bin, mutate, path):
    r = check_config(variant(mutate), binary=virtmux_bin)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert path in r.stderr, r.stderr


def test_ssh_error_text(virtmux_bin):
    r = check_config(variant(_ssh), binary=virtmux_bin)
    assert r.returncode == 1
    assert 'upstreams[0].uri' in r.stderr and "ssh" in r.stderr, r.stderr


def test_not_json(virtmux_bin):
    r = check_config("{ this is not json", binary=virtmux_bin)
    assert r.returncode == 1
    assert r.stderr.strip()


def test_missing_file(virtmux_bin):
    missing = os.path.join(tempfile.gettempdir(), "virtmux-no-such-file.json")
    r = subprocess.run([str(virtmux_bin), "--check-config", missing],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=harness.scaled(10),
                       env=harness.sanitizer_env())
    assert r.returncode == 1
    assert r.stderr.strip()


def test_refuses_to_start_with_bad_config(virtmux_bin):
    gw = harness.Virtmux(variant(_ssh), binary=virtmux_bin, start_timeout=5)
    try:
        with pytest.raises(harness.HarnessError):
            gw.start()
        assert gw.proc.returncode not in (None, 0)
        assert "upstreams[0].uri" in gw.log_text()
    finally:
        gw.cleanup()


@pytest.mark.parametrize("state", ["client-open", "no-clients",
                                   "upstream-down"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_clean_exit_on_signal(libvirtd, gateway, sig, state):
    gw = gateway.single(libvirtd.direct_uri)
    conn = libvirt.open(gw.uri())       # a live client and upstream
    try:
        assert conn.lookupByName("test").info()[0] == 1
        if state == "no-clients":
            conn.close()
            conn = None
        elif state == "upstream-down":
            libvirtd.kill9()
        time.sleep(0.2)
        rc = gw.stop(timeout=10, sig=sig)
        assert rc == 0, gw.log_tail()
    finally:
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
    assert virsh(gw.uri(), "list").returncode == 1      # it is gone


PROC_DOMAIN_SCREENSHOT = 211


def _start_screenshot(client):
    """Start a screenshot stream on a RawClient and leave it open: the
    gateway holds a dedicated upstream connection for it until the client
    finishes, aborts or leaves."""
    dom = client.lookup_domain("test")
    pkt = client.call(PROC_DOMAIN_SCREENSHOT,
                      harness.xdr_domain(dom["name"], dom["uuid"], dom["id"])
                      + harness.xdr_u32(0) + harness.xdr_u32(0), stream=True)
    harness.RawClient.check_ok(pkt)
    return dom


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_exit_with_everything_in_flight(libvirtd, gateway, raw_subscribers,
                                        sig):
    """Stopped while sessions hold every kind of state: an event
    registration, an open stream, a stream's connection saying goodbye to a
    libvirtd that does not answer, a call in flight and one queued behind
    it. The drain closes the idle subscriber at once and, at
    limits.drain_timeout_s, every session still busy; everything is freed
    (the sanitizer stage checks that nothing leaks and nothing freed is
    used) and the exit is 0."""
    gw = gateway.single(libvirtd.direct_uri,
                        pool={"max_connections": 1, "max_inflight": 1},
                        limits={"drain_timeout_s": 1})
    sub = raw_subscribers(port=gw.port)
    sub.register()
    streaming = harness.RawClient(port=gw.port)
    leaving = harness.RawClient(port=gw.port)
    caller = harness.RawClient(port=gw.port)
    try:
        streaming.handshake()
        _start_screenshot(streaming)
        leaving.handshake()
        _start_screenshot(leaving)
        caller.handshake()
        dom = caller.lookup_domain("test")

        libvirtd.sigstop()
        # the stream's connection retires: CONNECT_CLOSE goes unanswered
        leaving.close()
        info = harness.xdr_domain(dom["name"], dom["uuid"], dom["id"])
        for _ in range(2):      # one in flight, one queued behind it
            caller.send_packet(harness.REMOTE_PROGRAM,
                               harness.REMOTE_VERSION,
                               harness.PROC_DOMAIN_GET_INFO,
                               harness.TYPE_CALL, caller.next_serial(),
                               payload=info)
        assert harness.wait_until(
            lambda: "stream" in gw.log_text()
            and "closed: client hung up" in gw.log_text(),
            harness.scaled(5.0)), gw.log_tail()
        time.sleep(0.3)

        rc = gw.stop(timeout=10, sig=sig)
        assert rc == 0, gw.log_tail()
        # every session still open was closed on the way out: the idle
        # subscriber by the drain, the busy ones at its timeout
        log = gw.log_text()
        assert log.count("closed: virtmux is shutting down (drained)") == 1, log
        assert log.count("closed: drain timeout: virtmux is stopping") == 2, log
        assert "closed: drain timeout: virtmux is stopping (2 calls " \
            "outstanding)" in log, log
        assert "calls cut off at the 1 s timeout" in log, log
    finally:
        libvirtd.sigcont()
        for c in (streaming, leaving, caller):
            c.close()
