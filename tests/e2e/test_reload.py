"""SIGHUP reloads the whole config file, end to end.

A real libvirtd (test driver), libvirt-python clients through the gateway.
The gateway's config file is rewritten and the process gets SIGHUP; what
must hold:

* under load (32 clients calling continuously) a reload that adds an
  upstream and changes the policy fails no call; new clients reach the new
  upstream by URI path and get the new policy verdict, sessions already
  open keep theirs;
* a broken file (JSON syntax, or a value config.c refuses) is refused with
  an error line naming the place, and the running config keeps serving;
* listeners added by a reload accept, removed ones refuse (their sessions
  go on until they leave), unchanged ones keep their socket;
* an upstream removed while a session uses it: that session keeps working,
  a new one is refused with a clear error;
* keys that need a restart (admin.address) are kept, with a warning.
"""

import json
import os
import signal
import tempfile
import threading
import time

import libvirt
import pytest

import harness
from harness import wait_until

NCLIENTS = 32
FREED = "an earlier configuration is no longer used: freed"


def tcp_listener(name="tcp"):
    return {"name": name, "address": "127.0.0.1:%d" % harness.free_port(), "auth": "none"}


def reload(gw, config, expect_ok=True):
    """Write `config` (a dict, or raw text) as the gateway's file, SIGHUP,
    and wait for the outcome line; returns the log written since."""
    before = len(gw.log_text())
    with open(gw.config_path, "w") as f:
        if isinstance(config, str):
            f.write(config)
        else:
            json.dump(config, f, indent=2)
            gw.config = config
    gw.proc.send_signal(signal.SIGHUP)
    want = "reloaded " if expect_ok else "reload refused"
    assert wait_until(lambda: want in gw.log_text()[before:], timeout=harness.scaled(10)), \
        gw.log_tail()
    return gw.log_text()[before:]


def open_conn(uri):
    return harness.call_with_timeout(libvirt.open, uri, timeout=harness.scaled(20))


def close_quietly(*conns):
    for c in conns:
        try:
            c.close()
        except libvirt.libvirtError:
            pass


class Load:
    """NCLIENTS connections, each calling dom.info() in its own thread
    until stopped; every failure is recorded."""

    def __init__(self, uri, n=NCLIENTS):
        self.conns = [open_conn(uri) for _ in range(n)]
        self.calls = [0] * n
        self.errors = []
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def run(self, i):
        try:
            dom = self.conns[i].lookupByName("test")
        except libvirt.libvirtError as e:
            self.errors.append((i, "lookup", str(e)))
            return
        while not self.stop_ev.is_set():
            try:
                dom.info()
                self.calls[i] += 1
            except libvirt.libvirtError as e:
                self.errors.append((i, time.monotonic(), str(e)))
            time.sleep(0.005)

    def snapshot(self):
        return list(self.calls)

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(harness.scaled(10))
        close_quietly(*self.conns)


def base_config(libvirtd, listeners=None, upstreams=None, policy=None, **kw):
    cfg = harness.make_config(
        upstreams or [harness.upstream_entry("hv1", libvirtd.direct_uri)],
        default_upstream=kw.pop("default_upstream", "hv1"),
        listeners=listeners or [tcp_listener()], admin=True, **kw)
    if policy is not None:
        cfg["policy"] = policy
    return cfg


def pools_of(gw, upstream):
    return [p for p in gw.status()["pools"] if p["upstream"] == upstream]


def test_reload_under_load(libvirtd, gateway):
    """32 clients call continuously while a SIGHUP adds upstream hv2 and
    makes TCP clients read-only: no call fails, a new client reaches hv2 by
    its path and is read-only, an old session still writes."""
    allow = {"default": "allow"}
    cfg = base_config(libvirtd, policy=allow)
    gw = gateway(cfg)
    old = open_conn(gw.uri())
    old_dom = old.lookupByName("test")
    load = Load(gw.uri())
    try:
        assert wait_until(lambda: all(load.snapshot()), timeout=harness.scaled(20)), \
            "not every client got going: %r %r" % (load.snapshot(), load.errors[:3])
        new = json.loads(json.dumps(cfg))
        new["upstreams"].append(harness.upstream_entry("hv2", libvirtd.direct_uri))
        new["policy"] = {"default": "allow",
                         "rules": [{"match": {"source": "127.0.0.0/8"}, "readonly": True}]}
        before = load.snapshot()
        log = reload(gw, new)
        assert "upstream hv2 added" in log, log
        # the load goes on after the reload, every client
        assert wait_until(lambda: all(a > b + 5 for a, b in zip(load.snapshot(), before)),
                          timeout=harness.scaled(20)), (before, load.snapshot())

        # a new client reaches the new upstream by its path, under the new policy
        c2 = open_conn(gw.uri("hv2/default"))
        try:
            assert c2.lookupByName("test").info()[0] in (1, 3)
            assert pools_of(gw, "hv2"), gw.status()["pools"]
            with pytest.raises(libvirt.libvirtError) as e:
                c2.lookupByName("test").suspend()
            assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
        finally:
            close_quietly(c2)
        c1 = open_conn(gw.uri())
        try:
            with pytest.raises(libvirt.libvirtError) as e:
                c1.lookupByName("test").suspend()
            assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
        finally:
            close_quietly(c1)
        # a session opened before the reload keeps its read-write verdict
        old_dom.suspend()
        old_dom.resume()
        # hv1 did not change: everybody read-write still shares its one pool
        rw = [p for p in pools_of(gw, "hv1") if not p["readonly"]]
        assert len(rw) == 1, gw.status()["pools"]

        # a second reload under load changes hv1's pool settings: new sessions get a pool
        # with them, the 32 keep theirs
        new2 = json.loads(json.dumps(new))
        new2["upstreams"][0]["pool"] = {"max_connections": 2}
        new2["policy"] = allow
        before = load.snapshot()
        log = reload(gw, new2)
        assert "upstream hv1 changed" in log, log
        c3 = open_conn(gw.uri())
        try:
            assert c3.lookupByName("test").info()[0] in (1, 3)
            rw = [p for p in pools_of(gw, "hv1") if not p["readonly"]]
            assert len(rw) == 2, gw.status()["pools"]
        finally:
            close_quietly(c3)
        assert wait_until(lambda: all(a > b + 5 for a, b in zip(load.snapshot(), before)),
                          timeout=harness.scaled(20)), (before, load.snapshot())
    finally:
        load.stop()
        close_quietly(old)
    assert load.errors == [], load.errors[:5]
    assert sum(load.calls) > NCLIENTS * 10
    assert gw.running()


@pytest.mark.parametrize("broken", ["syntax", "semantic"])
def test_broken_config_keeps_running_one(libvirtd, gateway, broken):
    cfg = base_config(libvirtd)
    gw = gateway(cfg)
    conn = open_conn(gw.uri())
    try:
        if broken == "syntax":
            text = json.dumps(cfg, indent=2)[:-2] + ",,}"
            log = reload(gw, text, expect_ok=False)
            assert "reload: " in log and "virtmux.json:" in log, log
        else:
            bad = json.loads(json.dumps(cfg))
            bad["upstreams"][0]["uri"] = "test+ssh://h/default"
            bad["limits"] = {"no_such_limit": 1}
            bad["listeners"].append(tcp_listener("extra"))
            log = reload(gw, bad, expect_ok=False)
            assert "upstreams[0].uri" in log, log
            assert "limits.no_such_limit" in log, log
            # nothing of it was applied: the extra listener was never opened
            host, port = harness.split_address(bad["listeners"][1]["address"])
            assert not harness.tcp_accepts(host, port)
        assert "ERROR" in log or "error" in log, log
        # the running config keeps serving, old and new clients alike
        assert conn.lookupByName("test").info()[0] in (1, 3)
        c2 = open_conn(gw.uri())
        assert c2.getVersion() > 0
        close_quietly(c2)
        # and a good file afterwards is taken
        reload(gw, cfg)
        assert conn.getVersion() > 0
    finally:
        close_quietly(conn)


def test_listeners_added_removed_kept(libvirtd, gateway):
    sockdir = tempfile.mkdtemp(prefix="virtmux-reload-")
    unix_path = os.path.join(sockdir, "gw.sock")
    kept = tcp_listener("kept")
    cfg = base_config(libvirtd, listeners=[kept, {"name": "local", "unix": unix_path,
                                                  "auth": "none"}])
    gw = gateway(cfg)
    on_kept = open_conn(gw.uri())
    on_removed = open_conn(gw.unix_uri())
    added = tcp_listener("added")
    new = json.loads(json.dumps(cfg))
    new["listeners"] = [kept, added]
    try:
        log = reload(gw, new)
        assert "2 listeners (1 opened, 1 closed)" in log, log
        # the kept listener was not reopened
        assert "L:kept" not in log, log
        host, port = harness.split_address(added["address"])
        c = open_conn("test+tcp://%s:%d/default" % (host, port))
        assert c.getVersion() > 0
        close_quietly(c)
        assert not os.path.exists(unix_path)
        with pytest.raises(libvirt.libvirtError):
            libvirt.open("test+unix:///default?socket=%s" % unix_path)
        # sessions on the removed and the kept listener go on
        assert on_removed.lookupByName("test").info()[0] in (1, 3)
        assert on_kept.lookupByName("test").info()[0] in (1, 3)
        c = open_conn(gw.uri())
        assert c.getVersion() > 0
        close_quietly(c)
        # a listener moved to another address is reopened there
        moved = tcp_listener("added")
        new2 = json.loads(json.dumps(new))
        new2["listeners"] = [kept, moved]
        log = reload(gw, new2)
        assert "2 listeners (1 opened, 1 closed)" in log, log
        assert not harness.tcp_accepts(host, port)
        c = open_conn("test+tcp://%s:%d/default" % harness.split_address(moved["address"]))
        assert c.getVersion() > 0
        close_quietly(c)
    finally:
        close_quietly(on_kept, on_removed)
        os.rmdir(sockdir)
    assert gw.running()


def test_upstream_removed_while_in_use(libvirtd, gateway):
    ups = [harness.upstream_entry("hv1", libvirtd.direct_uri),
           harness.upstream_entry("hv2", libvirtd.direct_uri, idle_timeout_s=1)]
    cfg = base_config(libvirtd, upstreams=ups, default_upstream=None)
    gw = gateway(cfg)
    user = open_conn(gw.uri("hv2/default"))
    dom = user.lookupByName("test")
    new = json.loads(json.dumps(cfg))
    new["upstreams"] = ups[:1]
    try:
        log = reload(gw, new)
        assert "upstream hv2 removed" in log, log
        for _ in range(20):
            assert dom.info()[0] in (1, 3)
        with pytest.raises(libvirt.libvirtError) as e:
            libvirt.open(gw.uri("hv2/default"))
        assert "no upstream for this name" in str(e.value), str(e.value)
        assert e.value.get_error_code() == libvirt.VIR_ERR_NO_CONNECT
        assert user.getVersion() > 0
    finally:
        dom = None
        close_quietly(user)
    # once its last session has gone, the removed upstream's pool goes too
    assert wait_until(lambda: not pools_of(gw, "hv2"), timeout=harness.scaled(10)), \
        gw.status()["pools"]
    c = open_conn(gw.uri("hv1/default"))
    assert c.getVersion() > 0
    close_quietly(c)


def test_restart_only_keys_kept(libvirtd, gateway):
    cfg = base_config(libvirtd)
    gw = gateway(cfg)
    admin_addr = cfg["admin"]["address"]
    new = json.loads(json.dumps(cfg))
    new["admin"] = {"address": "127.0.0.1:%d" % harness.free_port()}
    new["limits"] = {"queue_timeout_ms": 5000}
    log = reload(gw, new)
    assert "admin.address/admin.unix changed: this needs a restart" in log, log
    assert harness.admin_status(admin_addr)["sessions"] == 0
    host, port = harness.split_address(new["admin"]["address"])
    assert not harness.tcp_accepts(host, port)


def test_old_snapshots_outlive_reloads(libvirtd, gateway):
    """A session opened under one config outlives two reloads, then leaves:
    its rule is released in its own snapshot, its changed upstream's
    connection retires (reading the old upstream entry), and the old
    snapshots are freed only after that (the sanitizer stage checks that
    nothing freed is read). max_sessions then counts in the current one."""
    def cfg_with(idle, cap):
        c = base_config(libvirtd, upstreams=[harness.upstream_entry(
            "hv1", libvirtd.direct_uri, idle_timeout_s=idle)],
            policy={"default": "deny",
                    "rules": [{"match": {"source": "127.0.0.0/8"}, "max_sessions": cap}]})
        return c
    first = cfg_with(1, 2)
    gw = gateway(first)

    def later(idle, cap):
        c = cfg_with(idle, cap)
        c["listeners"], c["admin"] = first["listeners"], first["admin"]
        return c
    s1 = open_conn(gw.uri())
    dom1 = s1.lookupByName("test")
    reload(gw, later(2, 2))
    s2 = open_conn(gw.uri())
    reload(gw, later(1, 3))
    assert len(pools_of(gw, "hv1")) == 2, gw.status()["pools"]
    # both sessions still point into their snapshots: none was freed
    assert gw.log_text().count(FREED) == 0
    for _ in range(10):
        assert dom1.info()[0] in (1, 3)
        assert s2.getVersion() > 0
    dom1 = None
    close_quietly(s1, s2)
    # both links go idle, retire (CONNECT_CLOSE) and their pools go
    assert wait_until(lambda: not gw.status()["pools"], timeout=harness.scaled(10)), \
        gw.status()["pools"]
    time.sleep(0.5)
    log = reload(gw, later(1, 2))
    assert gw.log_text().count(FREED) == 3, log
    conns = [open_conn(gw.uri()) for _ in range(2)]
    try:
        with pytest.raises(libvirt.libvirtError) as e:
            libvirt.open(gw.uri())
        assert "already has the 2 sessions" in str(e.value)
    finally:
        close_quietly(*conns)


def test_unix_listener_mode_change_reopens(libvirtd, gateway):
    """Same name and path, another mode: the socket is reopened in place (the
    old one closed first, so the new bind does not meet a live socket)."""
    sockdir = tempfile.mkdtemp(prefix="virtmux-reload-")
    unix_path = os.path.join(sockdir, "gw.sock")
    local = {"name": "local", "unix": unix_path, "auth": "none", "mode": "0660"}
    cfg = base_config(libvirtd, listeners=[tcp_listener(), local])
    gw = gateway(cfg)
    try:
        assert os.stat(unix_path).st_mode & 0o777 == 0o660
        before = open_conn(gw.unix_uri())
        new = json.loads(json.dumps(cfg))
        new["listeners"][1]["mode"] = "0600"
        log = reload(gw, new)
        assert "2 listeners (1 opened, 1 closed)" in log, log
        assert os.stat(unix_path).st_mode & 0o777 == 0o600
        c = open_conn(gw.unix_uri())
        assert c.getVersion() > 0
        assert before.getVersion() > 0
        close_quietly(c, before)
    finally:
        gw.stop()
        os.rmdir(sockdir)
