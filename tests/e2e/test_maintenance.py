"""Upstream maintenance that clients never notice.

* pool.reconnect_hold_ms: while libvirtd restarts, calls that were not yet
  sent wait for the pool to reconnect instead of failing, so a client that
  treats its first error as fatal (virt-manager: a close callback and an
  event loop) stays connected; calls in flight when the link died still
  fail at once; a call held longer than the hold fails with a clear error.
* Operator actions over HTTP: POST /upstreams/NAME/pause|resume|drain.
* A name libvirtd refuses is not re-opened upstream on every retry.
"""

import json
import signal
import subprocess
import sys
import threading
import time

import libvirt
import pytest

import harness
from harness import call_with_timeout, scaled, start_call, wait_until

# A libvirt-python client the way virt-manager holds its connection: the
# default event loop (so keepalive towards the gateway is on), a close
# callback and a lifecycle event registration. Any close, or any error of
# any call, is recorded; the test fails on either.
STRICT_CLIENT = r'''
import json, sys, threading, time
import libvirt

libvirt.registerErrorHandler(lambda *a: None, None)
libvirt.virEventRegisterDefaultImpl()


def loop():
    while True:
        libvirt.virEventRunDefaultImpl()


threading.Thread(target=loop, daemon=True).start()
lock = threading.Lock()
closed, events, results = [], [], []

conn = libvirt.open(sys.argv[1])
conn.registerCloseCallback(
    lambda c, reason, o: closed.append([time.monotonic(), reason]), None)
conn.domainEventRegisterAny(
    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    lambda c, d, e, det, o: events.append([time.monotonic(), d.name(), e]),
    None)


def one_call(tag):
    t0 = time.monotonic()
    try:
        info = conn.lookupByName("test").info()
        res = {"tag": tag, "ok": info[0], "start": t0, "end": time.monotonic()}
    except libvirt.libvirtError as e:
        res = {"tag": tag, "error": [e.get_error_code(), str(e)], "start": t0,
               "end": time.monotonic()}
    with lock:
        results.append(res)


def one_register(tag):
    t0 = time.monotonic()
    try:
        cid = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, lambda *a: None, None)
        res = {"tag": tag, "ok": cid, "start": t0, "end": time.monotonic()}
    except libvirt.libvirtError as e:
        res = {"tag": tag, "error": [e.get_error_code(), str(e)], "start": t0,
               "end": time.monotonic()}
    with lock:
        results.append(res)


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "spawn":
        fn = one_register if cmd.get("kind") == "register" else one_call
        for i in range(cmd["n"]):
            threading.Thread(target=fn, args=("%s%d" % (cmd["tag"], i),),
                             daemon=True).start()
        ans = {"spawned": cmd["n"]}
    elif op == "state":
        with lock:
            ans = {"closed": list(closed), "events": list(events),
                   "results": list(results), "alive": conn.isAlive()}
    elif op == "exit":
        break
    else:
        ans = {"unknown": op}
    print(json.dumps(ans), flush=True)
'''


class StrictClient:
    def __init__(self, uri):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STRICT_CLIENT, uri], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        first = self._read(20.0)
        assert first.get("ready"), first

    def _read(self, timeout):
        t, res = start_call(self.proc.stdout.readline)
        t.join(timeout)
        if t.is_alive() or not res.value:
            self.proc.kill()
            raise harness.HarnessError("strict client gave no answer: %s"
                                       % self.proc.stderr.read()[-2000:])
        return json.loads(res.value)

    def request(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(10.0)

    def spawn(self, tag, n=1, kind="call"):
        """n calls (kind "call": a domain lookup and info; "register": an
        event registration) in threads of their own; results() has them."""
        return self.request(op="spawn", tag=tag, n=n, kind=kind)

    def state(self):
        return self.request(op="state")

    def results(self, tag):
        return [r for r in self.state()["results"] if r["tag"].startswith(tag)]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def strict_clients():
    made = []

    def make(uri):
        c = StrictClient(uri)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def maint_config(lvd, admin=True, limits=None, **pool):
    return harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri, **pool)],
        default_upstream="hv1", admin=admin, limits=limits)


def only_pool(gw):
    pools = [p for p in gw.status()["pools"] if not p["readonly"]]
    assert len(pools) == 1, pools
    return pools[0]


def reconnect_hold_hits(gw):
    """virtmux_limit_hits_total{limit="reconnect_hold"} from /metrics."""
    import http.client
    host, port = harness.split_address(gw.config["admin"]["address"])
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith('virtmux_limit_hits_total{limit="reconnect_hold"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no reconnect_hold limit in /metrics")


def upstream_status(gw, name):
    """The upstream's entry in /status "upstreams"."""
    ups = [u for u in gw.status()["upstreams"] if u["name"] == name]
    assert len(ups) == 1, gw.status()["upstreams"]
    return ups[0]


def assert_untouched(client):
    """The strict client saw no close and no error."""
    st = client.state()
    assert st["closed"] == [], "close callback fired: %r" % st["closed"]
    errors = [r for r in st["results"] if "error" in r]
    assert errors == [], errors
    assert st["alive"] == 1


# --------------------------------------------------------------------------
# libvirtd restarts
# --------------------------------------------------------------------------

def test_strict_client_survives_libvirtd_restart(libvirtd, gateway,
                                                 strict_clients, connections):
    """libvirtd is down for 3 s: the strict client's calls issued during the
    outage (an event registration among them) complete once it is back, its
    next call succeeds, its close callback never fires, and its event
    registration is re-made upstream (an event after the restart reaches
    it)."""
    lvd = libvirtd
    gw = gateway(maint_config(lvd))
    client = strict_clients(gw.uri())
    client.spawn("before")
    assert wait_until(lambda: len(client.results("before")) == 1, 10)
    assert_untouched(client)
    assert gw.event_counts() == (1, 1)

    lvd.stop()
    down_at = time.monotonic()
    time.sleep(0.3)
    client.spawn("during", n=3)
    client.spawn("register", kind="register")
    # a new connection opened during the outage waits as well
    opener, opening = start_call(libvirt.open, gw.uri())
    time.sleep(max(0.0, down_at + 3.0 - time.monotonic()))
    assert opener.is_alive(), opening.error
    assert client.results("during") == [], "answered while libvirtd was down"
    assert client.results("register") == [], "answered while libvirtd was down"
    assert only_pool(gw).get("holding") is True
    lvd.start()
    up_at = time.monotonic()

    assert wait_until(lambda: len(client.results("during")) == 3,
                      scaled(10)), client.state()
    for r in client.results("during"):
        assert r["ok"] == libvirt.VIR_DOMAIN_RUNNING, r
        assert r["end"] >= up_at - 0.05, r
    assert wait_until(lambda: len(client.results("register")) == 1,
                      scaled(10)), client.state()
    assert "error" not in client.results("register")[0]
    opener.join(scaled(10))
    assert opening.error is None, opening.error
    connections.append(opening.value)
    assert opening.value.lookupByName("test").info()[0] == \
        libvirt.VIR_DOMAIN_RUNNING
    client.spawn("after")
    assert wait_until(lambda: len(client.results("after")) == 1, scaled(10))
    assert_untouched(client)

    # the lifecycle registration was re-made on the new libvirtd, the
    # reboot one made there
    assert wait_until(lambda: gw.event_counts() == (2, 2), scaled(5)), \
        gw.event_counts()
    other = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(other)
    seen = len(client.state()["events"])
    other.lookupByName("test").suspend()
    assert wait_until(lambda: len(client.state()["events"]) > seen,
                      scaled(5)), "no event after the restart"
    other.lookupByName("test").resume()
    assert_untouched(client)
    assert only_pool(gw).get("holding") is False


def test_call_held_past_the_hold_fails_clearly(libvirtd, gateway,
                                               connections):
    """With a short hold and a longer outage, a call issued during it fails
    after about the hold with libvirt's internal error naming the upstream,
    not a hang; after the restart the same connection works."""
    lvd = libvirtd
    gw = gateway(maint_config(lvd, reconnect_hold_ms=1500))
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(conn)
    dom = conn.lookupByName("test")
    assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    lvd.stop()
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(dom.info, timeout=scaled(10))
    took = time.monotonic() - t0
    e = ei.value
    assert e.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR, str(e)
    assert "virtmux cannot reach upstream hv1" in str(e), str(e)
    assert "(the call waited 1500 ms)" in str(e), str(e)
    assert 1.3 <= took <= 1.5 + scaled(2.0), took
    # a new session's open waits the same, then fails the same way
    t0 = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(libvirt.open, gw.uri(), timeout=scaled(10))
    took = time.monotonic() - t0
    assert "virtmux cannot reach upstream hv1" in str(ei.value), str(ei.value)
    assert "(the open waited 1500 ms)" in str(ei.value), str(ei.value)
    assert 1.3 <= took <= 1.5 + scaled(2.0), took
    # both counted as limit hits in /metrics
    assert reconnect_hold_hits(gw) == 2
    lvd.start()
    assert wait_until(lambda: only_pool(gw).get("holding") is False,
                      scaled(10))
    assert call_with_timeout(dom.info, timeout=10)[0] == \
        libvirt.VIR_DOMAIN_RUNNING


def test_event_registration_held_past_the_hold_fails_clearly(
        libvirtd, gateway, strict_clients):
    """An event registration made while the event link reconnects waits
    like a call, and fails after the hold with a clear error."""
    lvd = libvirtd
    gw = gateway(maint_config(lvd, reconnect_hold_ms=1500))
    client = strict_clients(gw.uri())     # holds a lifecycle registration
    lvd.stop()
    time.sleep(0.3)
    client.spawn("register", kind="register")
    assert wait_until(lambda: len(client.results("register")) == 1,
                      scaled(10))
    r, = client.results("register")
    took = r["end"] - r["start"]
    assert r["error"][0] == libvirt.VIR_ERR_INTERNAL_ERROR, r
    assert "cannot reach upstream hv1 for event registration (the call " \
        "waited 1500 ms)" in r["error"][1], r
    assert 1.3 <= took <= 1.5 + scaled(2.0), took
    lvd.start()
    client.spawn("after")
    assert wait_until(lambda: len(client.results("after")) == 1, scaled(10))
    assert "error" not in client.results("after")[0]
    assert client.state()["closed"] == []


def test_no_hold_fails_at_once(libvirtd, gateway, connections):
    """reconnect_hold_ms 0 is the old behaviour: a call during the outage
    fails at once."""
    lvd = libvirtd
    gw = gateway(maint_config(lvd, reconnect_hold_ms=0))
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(conn)
    dom = conn.lookupByName("test")
    dom.info()
    lvd.stop()
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(dom.info, timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert "cannot reach upstream hv1" in str(ei.value)


def test_stream_fails_cleanly_when_libvirtd_dies(libvirtd, gateway,
                                                 connections):
    """A stream whose dedicated upstream connection dies gets an error, not
    a hang, and the session carries on after the restart."""
    lvd = libvirtd
    gw = gateway(maint_config(lvd))
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(conn)
    dom = conn.lookupByName("test")
    lvd.sigstop()           # the stream's connection cannot get through
    st = conn.newStream(0)
    t, res = start_call(dom.screenshot, st, 0, 0)
    time.sleep(0.5)
    assert t.is_alive()
    lvd.kill9()
    t.join(scaled(10))
    assert not t.is_alive(), "stream creation hangs after libvirtd died"
    assert isinstance(res.error, libvirt.libvirtError), res.value
    assert res.error.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
    lvd.start()
    assert call_with_timeout(dom.info, timeout=scaled(15))[0] == \
        libvirt.VIR_DOMAIN_RUNNING


# --------------------------------------------------------------------------
# operator actions
# --------------------------------------------------------------------------

def test_admin_upstream_actions_answers(libvirtd, gateway):
    gw = gateway(maint_config(libvirtd))
    assert gw.admin("POST", "/upstreams/hv1/pause") == \
        (200, {"upstream": "hv1", "state": "paused"})
    assert gw.admin("POST", "/upstreams/hv1/drain") == \
        (200, {"upstream": "hv1", "state": "draining"})
    assert gw.admin("POST", "/upstreams/hv1/resume") == \
        (200, {"upstream": "hv1", "state": "active"})
    code, body = gw.admin("POST", "/upstreams/nosuch/pause")
    assert code == 404 and body["upstream"] == "nosuch", body
    code, _ = gw.admin("POST", "/upstreams/hv1/explode")
    assert code == 404
    code, _ = gw.admin("GET", "/upstreams/hv1/pause")
    assert code == 405
    code, _ = gw.admin("GET", "/nothing")
    assert code == 404


def test_pause_holds_calls_until_resume(libvirtd, gateway, strict_clients):
    """Paused: the strict client's calls wait in the queue (nothing goes
    upstream), resume sends them and they succeed."""
    lvd = libvirtd
    # coalesce off: the two identical held calls would otherwise wait as one
    gw = gateway(maint_config(lvd, coalesce=False))
    client = strict_clients(gw.uri())
    client.spawn("warm")
    assert wait_until(lambda: len(client.results("warm")) == 1, 10)
    assert gw.upstream_action("hv1", "pause") == "paused"
    client.spawn("held", n=2)
    assert wait_until(lambda: only_pool(gw)["queued"] >= 2, scaled(5)), \
        only_pool(gw)
    pool = only_pool(gw)
    assert pool["operator"] == "paused" and pool["holding"]
    assert all(link["inflight"] == 0 for link in pool["links"]), pool
    time.sleep(1.0)
    assert client.results("held") == []
    assert gw.upstream_action("hv1", "resume") == "active"
    assert wait_until(lambda: len(client.results("held")) == 2, scaled(5))
    assert_untouched(client)
    pool = only_pool(gw)
    assert pool["operator"] == "active" and not pool["holding"]


def test_pause_hold_deadline_applies(libvirtd, gateway, connections):
    lvd = libvirtd
    gw = gateway(maint_config(lvd, reconnect_hold_ms=1000))
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(conn)
    dom = conn.lookupByName("test")
    gw.upstream_action("hv1", "pause")
    t0 = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(dom.info, timeout=scaled(10))
    took = time.monotonic() - t0
    assert "upstream hv1 is paused for maintenance" in str(ei.value)
    assert 0.8 <= took <= 1.0 + scaled(2.0), took
    gw.upstream_action("hv1", "resume")
    assert call_with_timeout(dom.info, timeout=10)[0] == \
        libvirt.VIR_DOMAIN_RUNNING


def test_drain(libvirtd, gateway, connections):
    """Draining: new sessions get a clear error, the existing one carries
    on, its upstream connections close once it leaves; resume undoes it."""
    lvd = libvirtd
    gw = gateway(maint_config(lvd))
    old = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    dom = old.lookupByName("test")
    assert gw.upstream_action("hv1", "drain") == "draining"
    assert only_pool(gw)["operator"] == "draining"
    assert upstream_status(gw, "hv1")["operator"] == "draining"
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    assert "upstream hv1 is draining" in str(ei.value), str(ei.value)
    assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert lvd.nclients() >= 1
    del dom                 # (a domain object keeps its connection open)
    call_with_timeout(old.close, timeout=10)
    # no idle_timeout_s wait: the last session out closes the connection
    assert wait_until(lambda: lvd.nclients() == 0, scaled(5)), lvd.nclients()
    assert wait_until(lambda: gw.status()["totals"]["links"] == 0, scaled(5))
    # no pool left, the upstream still says so
    assert upstream_status(gw, "hv1")["operator"] == "draining"
    assert gw.upstream_action("hv1", "resume") == "active"
    assert upstream_status(gw, "hv1")["operator"] == "active"
    new = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(new)
    assert new.lookupByName("test").info()[0] == libvirt.VIR_DOMAIN_RUNNING


# --------------------------------------------------------------------------
# refused CONNECT_OPENs
# --------------------------------------------------------------------------

def _max_client_id(lvd):
    """Open and close a direct probe connection: libvirtd's client ids
    count up, so the probe's id tells how many connections came before."""
    probe = call_with_timeout(libvirt.open, lvd.direct_uri, timeout=10)
    try:
        return max(lvd.client_ids())
    finally:
        probe.close()


def test_refused_name_is_not_reopened_per_retry(libvirtd, gateway):
    lvd = libvirtd
    gw = gateway(maint_config(lvd))
    bad_direct = "test+tcp://127.0.0.1:%d/nosuch" % lvd.port
    with pytest.raises(libvirt.libvirtError) as direct:
        call_with_timeout(libvirt.open, bad_direct, timeout=10)
    before = _max_client_id(lvd)
    errors = []
    for _ in range(10):
        with pytest.raises(libvirt.libvirtError) as ei:
            call_with_timeout(libvirt.open, gw.uri("nosuch"), timeout=10)
        errors.append((ei.value.get_error_code(), str(ei.value)))
    after = _max_client_id(lvd)
    upstream_connections = after - before - 1
    assert upstream_connections <= 1, upstream_connections
    # still libvirtd's own refusal, every time
    assert set(errors) == {(direct.value.get_error_code(), str(direct.value))}, \
        errors
    assert "virtmux" not in errors[0][1]


# --------------------------------------------------------------------------
# a home that never comes back
# --------------------------------------------------------------------------

def test_session_rehomed_when_its_link_gives_up(libvirtd, gateway,
                                                connections, strict_clients):
    """Two sessions homed on two upstream connections; libvirtd comes back
    admitting one client only, so one connection never reconnects. After
    give_up_s its session moves to the connection that did (no close
    callback, no error) instead of being closed, and the event
    registrations live on whichever connection came back."""
    lvd = libvirtd
    gw = gateway(harness.make_config(
        # coalesce off: the two identical calls below must take two slots
        [harness.upstream_entry("hv1", lvd.direct_uri, max_connections=2,
                                max_inflight=1, give_up_s=2,
                                connect_timeout_ms=500, coalesce=False)],
        default_upstream="hv1", admin=True))
    first = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(first)
    # two calls at once with max_inflight 1: the pool opens a second link
    lvd.sigstop()
    calls = [start_call(first.lookupByName, "test") for _ in range(2)]
    assert wait_until(lambda: gw.status()["totals"]["links"] == 2, 5)
    lvd.sigcont()
    for t, res in calls:
        t.join(10)
        assert res.error is None, res.error
    # the second session is homed on the least used link: the new one
    second = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(second)
    homes = sorted(link["sessions"] for link in only_pool(gw)["links"])
    assert homes == [1, 1], only_pool(gw)
    strict = strict_clients(gw.uri())   # a third session, with an event
    assert gw.event_counts() == (1, 1)

    lvd.stop()
    lvd.extra_conf.update(max_clients=1, max_anonymous_clients=1)
    lvd.start()
    # one link gets libvirtd's only slot; the other's handshakes time out
    # until it gives up, and its session moves over
    # (a link's "sessions" counts the event registrations' reference too)
    assert wait_until(lambda: "lost for good: now U#" in gw.log_text()
                      and len(only_pool(gw)["links"]) == 1, scaled(15)), \
        only_pool(gw)
    assert only_pool(gw)["links"][0]["sessions"] >= 3
    for c in (first, second):
        assert call_with_timeout(
            lambda: c.lookupByName("test").info()[0], timeout=10) == \
            libvirt.VIR_DOMAIN_RUNNING
    assert gw.status()["sessions"] == 3
    assert wait_until(lambda: gw.event_counts() == (1, 1), scaled(5))
    seen = len(strict.state()["events"])
    first.lookupByName("test").suspend()
    assert wait_until(lambda: len(strict.state()["events"]) > seen,
                      scaled(5)), "no event after the re-home"
    first.lookupByName("test").resume()
    strict.spawn("after")
    assert wait_until(lambda: len(strict.results("after")) == 1, scaled(10))
    assert_untouched(strict)


def test_operator_state_survives_a_reload(libvirtd, gateway, connections):
    """A drained upstream stays drained across a SIGHUP reload that changes
    it (its new pools follow the state by name); resume then works."""
    lvd = libvirtd
    cfg = maint_config(lvd)
    gw = gateway(cfg)
    assert gw.upstream_action("hv1", "drain") == "draining"
    changed = json.loads(json.dumps(cfg))
    changed["upstreams"][0]["pool"] = {"idle_timeout_s": 30}
    before = len(gw.log_text())
    with open(gw.config_path, "w") as f:
        json.dump(changed, f)
    gw.config = changed
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reloaded " in gw.log_text()[before:],
                      scaled(10)), gw.log_tail()
    assert upstream_status(gw, "hv1")["operator"] == "draining"
    with pytest.raises(libvirt.libvirtError) as ei:
        call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    assert "upstream hv1 is draining" in str(ei.value), str(ei.value)
    assert gw.upstream_action("hv1", "resume") == "active"
    conn = call_with_timeout(libvirt.open, gw.uri(), timeout=10)
    connections.append(conn)
    assert conn.lookupByName("test").info()[0] == libvirt.VIR_DOMAIN_RUNNING
