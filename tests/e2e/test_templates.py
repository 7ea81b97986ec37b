"""Upstream templates (issue #13 item 1): an upstream named by the client's
first path segment is made on first use from the template whose glob matches
it, its name is checked as a host name before anything is made or connected,
limits.max_upstreams holds, idle ones are freed and leave /status and the
/metrics gauges, and policy "upstreams" takes globs.

Each template here points at a counting tap in front of one real libvirtd,
with {name} in the URI's query (the test driver ignores it): every upstream
made is a distinct pool with its own connections, and the tap proves what
was (and was not) connected. The fleet test (test_fleet.py) uses {name} as
the host.
"""

import threading

import libvirt
import pytest

import harness
import tap as tapmod
from harness import check_config, wait_until

VIR_ERR_ACCESS_DENIED = 88


def dynamic(status):
    """{name: upstream entry} of the upstreams made from templates."""
    return {u["name"]: u for u in status["upstreams"] if u.get("template")}


@pytest.fixture
def tap(libvirtd):
    t = tapmod.Tap(libvirtd.port)
    yield t
    t.stop()


@pytest.fixture
def keeper(libvirtd):
    """Keeps the test driver's state (dropped with its last connection)."""
    c = libvirt.open(libvirtd.direct_uri)
    yield c
    c.close()


def template_config(tap, named_uri, limits=None, policy=None, idle_s=1):
    cfg = harness.make_config(
        [harness.upstream_entry("named", named_uri)],
        limits=limits, admin=True, policy=policy)
    cfg["upstream_templates"] = [{
        "match": "hv-*",
        "uri": "test+tcp://127.0.0.1:%d/default?hv={name}" % tap.port,
        "pool": {"idle_timeout_s": idle_s, "max_connections": 2},
    }]
    return cfg


def open_conn(gw, name, readonly=False):
    uri = gw.uri("%s/default" % name)
    if readonly:
        return harness.call_with_timeout(libvirt.openReadOnly, uri, timeout=30)
    return harness.call_with_timeout(libvirt.open, uri, timeout=30)


def open_error(gw, name):
    try:
        c = open_conn(gw, name)
    except libvirt.libvirtError as e:
        return e
    c.close()
    return None


def test_first_use_makes_the_upstream(gateway, libvirtd, keeper, tap):
    gw = gateway(template_config(tap, libvirtd.direct_uri))
    st = gw.status()
    assert dynamic(st) == {}, "nothing exists before first use"
    assert st["templates"] == [{"match": "hv-*", "uri": gw.config["upstream_templates"][0]["uri"],
                                "upstreams": 0}]
    assert tap.nconns == 0, "an unused template connects nowhere"

    c1 = open_conn(gw, "hv-1")
    c2 = open_conn(gw, "hv-2")
    try:
        # the real libvirtd answers through both (its default domain "test")
        assert "test" in [d.name() for d in c1.listAllDomains()]
        assert "test" in [d.name() for d in c2.listAllDomains()]
        assert c1.getURI().endswith("/hv-1/default")
        st = gw.status()
        dyn = dynamic(st)
        assert set(dyn) == {"hv-1", "hv-2"}
        assert dyn["hv-1"]["template"] == "hv-*"
        assert dyn["hv-1"]["uri"].endswith("/default?hv=hv-1")
        assert dyn["hv-1"]["state"] == "ready" and dyn["hv-1"]["sessions"] == 1
        assert st["templates"][0]["upstreams"] == 2
        assert st["dynamic_upstreams"] == {"count": 2, "max": 1024}
        # separate upstreams, separate connections
        assert tap.nconns == 2
        m = gw.metrics_text()
        assert 'virtmux_upstream_connections{upstream="hv-1",state="ready"} 1' in m
        assert "virtmux_dynamic_upstreams 2" in m
        # a second session of hv-1 shares its upstream
        c3 = open_conn(gw, "hv-1")
        assert len(c3.listAllDomains()) >= 1
        assert set(dynamic(gw.status())) == {"hv-1", "hv-2"}
        c3.close()
    finally:
        c1.close()
        c2.close()
    # a named upstream still wins over a template and is not listed as made
    c = open_conn(gw, "named")
    assert "test" in [d.name() for d in c.listAllDomains()]
    c.close()


@pytest.mark.parametrize("bad, rule", [
    ("hv-a_b", "has the character 0x5f"),
    ("hv-" + "x" * 61, "label longer than 63"),
    ("hv-x..y", "empty label"),
    ("hv-x.", "empty label"),
    ("hv-" + ("a" * 60 + ".") * 5 + "b", "characters long"),
])
def test_bad_name_refused_before_any_connect(gateway, libvirtd, keeper, tap, bad, rule):
    gw = gateway(template_config(tap, libvirtd.direct_uri))
    e = open_error(gw, bad)
    assert e is not None, "open of %r should fail" % bad
    msg = e.get_error_message()
    assert rule in msg and "host name" in msg, msg
    assert e.get_error_code() == harness.VIR_ERR_NO_CONNECT, msg
    assert tap.nconns == 0, "a connection was attempted for %r" % bad
    st = gw.status()
    assert dynamic(st) == {}
    assert st["sessions"] == 0 or all(s["upstream"] is None for s in st["session_list"])
    # the counter works: a good name does connect
    c = open_conn(gw, "hv-ok")
    c.close()
    assert tap.nconns == 1


def test_max_upstreams_holds(gateway, libvirtd, keeper, tap):
    gw = gateway(template_config(tap, libvirtd.direct_uri,
                                 limits={"max_upstreams": 2}))
    c1 = open_conn(gw, "hv-1")
    c2 = open_conn(gw, "hv-2")
    try:
        e = open_error(gw, "hv-3")
        assert e is not None
        assert "limits.max_upstreams (2)" in e.get_error_message(), e.get_error_message()
        assert tap.nconns == 2, "hv-3 must not have been connected"
        # existing ones still take new sessions at the cap
        c1b = open_conn(gw, "hv-1")
        c1b.listAllDomains()
        c1b.close()
        # and the named upstream is not counted
        c = open_conn(gw, "named")
        c.close()
        st = gw.status()
        assert set(dynamic(st)) == {"hv-1", "hv-2"}
        assert st["dynamic_upstreams"]["count"] == 2
        assert 'virtmux_limit_hits_total{limit="max_upstreams"} 1' in gw.metrics_text() or \
            'limit="max_upstreams"' in gw.metrics_text()
    finally:
        c1.close()
    # once hv-1 goes idle its place is free again
    wait_until(lambda: "hv-1" not in dynamic(gw.status()), timeout=harness.scaled(15))
    c3 = open_conn(gw, "hv-3")
    try:
        assert len(c3.listAllDomains()) >= 1
        assert set(dynamic(gw.status())) == {"hv-2", "hv-3"}
    finally:
        c3.close()
        c2.close()


def test_idle_upstream_is_freed_and_leaves_status(gateway, libvirtd, keeper, tap):
    gw = gateway(template_config(tap, libvirtd.direct_uri, idle_s=1))
    c = open_conn(gw, "hv-idle")
    c.listAllDomains()
    assert "hv-idle" in dynamic(gw.status())
    c.close()
    # pool.idle_timeout_s (1 s) after its last session, its connection retires, the pool is
    # freed, and the upstream with it
    assert wait_until(lambda: "hv-idle" not in dynamic(gw.status()),
                      timeout=harness.scaled(15))
    st = gw.status()
    assert st["dynamic_upstreams"]["count"] == 0 and st["templates"][0]["upstreams"] == 0
    assert not [p for p in st["pools"] if p["upstream"] == "hv-idle"]
    # its counters go once its connection has said goodbye (CONNECT_CLOSE, at most 2 s)
    assert wait_until(lambda: 'upstream="hv-idle"' not in gw.metrics_text(),
                      timeout=harness.scaled(5)), "its gauges and counters left /metrics"
    m = gw.metrics_text()
    assert "virtmux_dynamic_upstreams 0" in m
    # libvirtd saw the connection go (CONNECT_CLOSE, then the socket)
    assert wait_until(lambda: libvirtd.nclients() <= 1, timeout=harness.scaled(10))
    # first use again makes it again
    c = open_conn(gw, "hv-idle")
    assert len(c.listAllDomains()) >= 1
    c.close()
    assert tap.nconns == 2


def test_upstream_in_use_is_not_freed(gateway, libvirtd, keeper, tap):
    gw = gateway(template_config(tap, libvirtd.direct_uri, idle_s=1))
    c = open_conn(gw, "hv-busy")
    try:
        # well past the idle timeout, the session's home connection stays
        for _ in range(3):
            threading.Event().wait(harness.scaled(1))
            assert "test" in [d.name() for d in c.listAllDomains()]
        assert "hv-busy" in dynamic(gw.status())
        assert tap.nconns == 1
    finally:
        c.close()


def test_policy_upstreams_take_globs(gateway, libvirtd, keeper, tap):
    policy = {"default": {"upstreams": ["hv-1*", "named"]}}
    gw = gateway(template_config(tap, libvirtd.direct_uri, policy=policy))
    for ok in ("hv-1", "hv-12", "named"):
        c = open_conn(gw, ok)
        assert len(c.listAllDomains()) >= 1
        c.close()
    e = open_error(gw, "hv-2")
    assert e is not None and e.get_error_code() == VIR_ERR_ACCESS_DENIED
    assert "upstream hv-2" in e.get_error_message()
    # a denied client makes nothing and connects nowhere
    assert "hv-2" not in dynamic(gw.status())
    assert tap.nconns == 2


def test_template_config_errors(libvirtd):
    base = harness.make_config([harness.upstream_entry("named", libvirtd.direct_uri)])

    def errors(**extra):
        cfg = dict(base, **extra)
        r = check_config(cfg)
        assert r.returncode != 0, cfg
        return r.stderr

    assert "upstream_templates[0].uri: has no {name}" in errors(
        upstream_templates=[{"match": "hv-*", "uri": "test+tcp://h/default"}])
    assert "upstream_templates[0].match" in errors(
        upstream_templates=[{"match": "hv/*", "uri": "test+tcp://{name}/default"}])
    assert "upstream_templates[0].name: unknown key" in errors(
        upstream_templates=[{"match": "hv-*", "name": "x", "uri": "test+tcp://{name}/x"}])
    assert "no upstream_templates[].match matches it" in errors(
        policy={"default": {"upstreams": ["hv-1"]}})
    # templates alone are a valid configuration, and their names may be named by policy
    ok = harness.make_config([], policy={"default": {"upstreams": ["hv-1", "db-*"]}})
    ok["upstream_templates"] = [{"match": "hv-*", "uri": "test+tcp://{name}/default",
                                 "pool": {"max_connections": 1}}]
    r = check_config(ok)
    assert r.returncode == 0, r.stderr
    r = check_config(dict(base, limits={"max_upstreams": 0}))
    assert r.returncode != 0 and "limits.max_upstreams" in r.stderr


def test_reload_keeps_or_replaces_made_upstreams(gateway, libvirtd, keeper, tap):
    """SIGHUP: an upstream made from an unchanged template carries on (same
    connection, one entry); after its template changes, a new session gets a
    new upstream of the same name from the new template while the old one
    serves its session until it leaves, then both go idle and are freed, and
    the old snapshots with them (the sanitizer stage checks nothing freed is
    read)."""
    import json
    import signal
    freed = "reload: an earlier configuration is no longer used: freed"
    first = template_config(tap, libvirtd.direct_uri, idle_s=1)
    first["log"] = {"level": "debug"}
    gw = gateway(first)

    def reload(cfg):
        before = len(gw.log_text())
        with open(gw.config_path, "w") as f:
            json.dump(cfg, f)
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded " in gw.log_text()[before:],
                          timeout=harness.scaled(10)), gw.log_tail()

    old = open_conn(gw, "hv-1")
    assert len(old.listAllDomains()) >= 1
    same = json.loads(json.dumps(first))
    same["limits"] = {"max_clients": 500}  # something else changes
    reload(same)
    s2 = open_conn(gw, "hv-1")
    assert len(s2.listAllDomains()) >= 1
    made = [u for u in gw.status()["upstreams"] if u["name"] == "hv-1"]
    assert len(made) == 1 and made[0]["sessions"] == 2, made
    assert tap.nconns == 1, "the unchanged upstream's connection is shared"
    s2.close()

    changed = json.loads(json.dumps(same))
    changed["upstream_templates"][0]["pool"]["max_connections"] = 3
    reload(changed)
    new = open_conn(gw, "hv-1")
    assert len(new.listAllDomains()) >= 1
    made = [u for u in gw.status()["upstreams"] if u["name"] == "hv-1"]
    assert len(made) == 2 and sorted(u["sessions"] for u in made) == [1, 1], made
    assert tap.nconns == 2
    # the old one still serves its session
    assert "test" in [d.name() for d in old.listAllDomains()]
    old.close()
    new.close()
    assert wait_until(lambda: not dynamic(gw.status()), timeout=harness.scaled(15))
    # both earlier snapshots were kept for hv-1's sake and are freed now (the trim timer
    # collects them within 10 s)
    assert wait_until(lambda: gw.log_text().count(freed) == 2, timeout=harness.scaled(15)), \
        gw.log_text().count(freed)
    c = open_conn(gw, "hv-1")
    assert len(c.listAllDomains()) >= 1
    c.close()


def test_operator_pause_applies_to_template_names(gateway, libvirtd, keeper, tap):
    """POST /upstreams/NAME/pause takes a name a template would make, before
    it exists and after it was freed (the state is kept by name); a name no
    template matches, or that is no host name, is 404."""
    gw = gateway(template_config(tap, libvirtd.direct_uri, idle_s=1))
    assert gw.admin("POST", "/upstreams/hv-5/pause") == \
        (200, {"upstream": "hv-5", "state": "paused"})
    assert gw.admin("POST", "/upstreams/db-1/pause")[0] == 404
    assert gw.admin("POST", "/upstreams/hv-a_b/pause")[0] == 404
    # made while paused: its pool is paused, so calls wait, and /status says so
    c = open_conn(gw, "hv-5")
    try:
        assert dynamic(gw.status())["hv-5"]["operator"] == "paused"
        _, result = harness.start_call(c.listAllDomains)
        threading.Event().wait(0.5)
        assert result.end is None, "a call went out while paused"
        assert gw.admin("POST", "/upstreams/hv-5/resume") == \
            (200, {"upstream": "hv-5", "state": "active"})
        assert wait_until(lambda: result.end is not None, timeout=harness.scaled(15))
        assert result.error is None and len(result.value) >= 1, result.error
    finally:
        c.close()


def test_template_cache_applies_to_made_upstreams(gateway, libvirtd, keeper, tap):
    """A template's "cache" is every made upstream's: a second read-only
    LIST_ALL_DOMAINS within the ttl is answered by the gateway (the tap sees
    one), counted under the made upstream's name, and the counters go with
    the upstream when it is freed."""
    cfg = template_config(tap, libvirtd.direct_uri, idle_s=1)
    cfg["upstream_templates"][0]["cache"] = {"ttl_ms": 60000,
                                             "procedures": ["CONNECT_LIST_ALL_DOMAINS"]}
    gw = gateway(cfg)
    c = open_conn(gw, "hv-c", readonly=True)
    try:
        # the first cacheable call makes the cache's lifecycle registration (on the made
        # upstream's own libvirtd); replies are stored once it is active
        first = sorted(d.name() for d in c.listAllDomains())
        assert wait_until(lambda: dynamic(gw.status())["hv-c"]["event_registrations"] == 1,
                          timeout=harness.scaled(5))
        threading.Event().wait(harness.scaled(0.2))
        mark = tap.mark()
        for _ in range(3):
            assert sorted(d.name() for d in c.listAllDomains()) == first
        assert "test" in first
        assert len(tap.calls(mark, proc=harness.PROC_CONNECT_LIST_ALL_DOMAINS)) == 1
        assert 'virtmux_cache_hits_total{upstream="hv-c"} 2' in gw.metrics_text()
    finally:
        c.close()
    assert wait_until(lambda: 'upstream="hv-c"' not in gw.metrics_text(),
                      timeout=harness.scaled(15))
