"""The admin endpoint (issue "operations", part 1): /healthz, HEAD, /metrics, /status,
the bearer token and the session disconnect action, checked with real clients (http.client,
libvirt-python) and Prometheus's own text parser (python3-prometheus-client).

Metrics tests scrape before and after real traffic and check that the values moved by what
the traffic did: N calls of a procedure raise its histogram count by N, a refused call the
denial counter, a failed login the auth-failure counter, and so on."""

import datetime
import http.client
import json
import os
import socket

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

import harness
from harness import wait_until
# fixtures and helpers of the auth and events tests, reused as they are
from test_auth_sasl import env, open_auth, open_error, sasl_config, Uris, USERS  # noqa: F401
from test_auth_tls import certs, tls_listener, tls_uri  # noqa: F401
from test_events_fanout import controller, flip  # noqa: F401


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the admin endpoint's unix socket."""

    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def admin_request(gw, method, path, headers=None, body=None, timeout=5.0):
    """One request to the gateway's admin endpoint -> (status, headers dict, body bytes)."""
    admin = gw.config["admin"]
    if "address" in admin:
        host, port = harness.split_address(admin["address"])
        conn = http.client.HTTPConnection(host, port, timeout=harness.scaled(timeout))
    else:
        conn = UnixHTTPConnection(admin["unix"], timeout=harness.scaled(timeout))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def admin_gateway(gateway, lvd, admin=True, **sections):
    cfg = harness.make_config([harness.upstream_entry("hv1", lvd.direct_uri)],
                              default_upstream="hv1", admin=admin, **sections)
    return gateway(cfg)


# --------------------------------------------------------------------------
# /healthz and HEAD
# --------------------------------------------------------------------------

def test_healthz_ok_while_serving(shared_libvirtd, gateway):
    gw = admin_gateway(gateway, shared_libvirtd)
    status, headers, body = admin_request(gw, "GET", "/healthz")
    assert status == 200
    assert body == b"ok\n"
    assert headers["content-type"].startswith("text/plain")
    assert headers["content-length"] == "3"


def test_healthz_on_unix_admin_socket(shared_libvirtd, gateway, tmp_path):
    gw = admin_gateway(gateway, shared_libvirtd, admin={"unix": str(tmp_path / "admin.sock")})
    status, _, body = admin_request(gw, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")


@pytest.mark.parametrize("path", ["/healthz", "/status", "/metrics", "/", "/nosuch"])
def test_head_is_get_without_body(shared_libvirtd, gateway, path):
    gw = admin_gateway(gateway, shared_libvirtd)
    gstatus, gheaders, gbody = admin_request(gw, "GET", path)
    hstatus, hheaders, hbody = admin_request(gw, "HEAD", path)
    assert hstatus == gstatus
    assert hbody == b""
    assert gbody != b""
    for key in ("content-type", "content-length"):
        assert hheaders.get(key) == gheaders.get(key), key
    # /status and /metrics are made fresh per request; their length may change
    if path not in ("/status", "/metrics"):
        assert int(hheaders["content-length"]) == len(gbody)


def test_unknown_path_404_and_wrong_method_405(shared_libvirtd, gateway):
    gw = admin_gateway(gateway, shared_libvirtd)
    assert admin_request(gw, "GET", "/nosuch")[0] == 404
    assert admin_request(gw, "GET", "/statusx")[0] == 404
    status, headers, _ = admin_request(gw, "POST", "/healthz", body=b"")
    assert status == 405
    assert "GET" in headers["allow"]
    assert admin_request(gw, "DELETE", "/status")[0] == 405


def test_index_lists_endpoints(shared_libvirtd, gateway):
    gw = admin_gateway(gateway, shared_libvirtd)
    status, _, body = admin_request(gw, "GET", "/")
    assert status == 200
    text = body.decode()
    for path in ("/healthz", "/status"):
        assert path in text


# --------------------------------------------------------------------------
# /metrics, read with Prometheus's own parser
# --------------------------------------------------------------------------


CONTENT_TYPE_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
N_CALLS = 7


def scrape(gw, headers=None):
    """GET /metrics -> {family name: Metric} (the parser's families)."""
    status, hdrs, body = admin_request(gw, "GET", "/metrics", headers=headers)
    assert status == 200, body[:300]
    assert hdrs["content-type"] == CONTENT_TYPE_0_0_4
    fams = {}
    for f in text_string_to_metric_families(body.decode("utf-8")):
        assert f.name not in fams, "family %s twice" % f.name
        fams[f.name] = f
    return fams


def sample(fams, family, suffix="", **labels):
    """The value of the sample `family + suffix` whose labels include `labels`
    (None when there is none)."""
    f = fams[family]
    name = f.name + suffix
    found = [s.value for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (family, labels, found)
    return found[0] if found else None


def total(fams, family, suffix="", **labels):
    """Sum over the samples of `family + suffix` whose labels include `labels`."""
    f = fams[family]
    return sum(s.value for s in f.samples
               if s.name == f.name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


def two_upstream_gateway(gateway, lvd, **sections):
    """hv1 (used) and spare (configured, never used: nothing listens there)."""
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri),
         harness.upstream_entry("spare", "test+tcp://127.0.0.1:1/default")],
        default_upstream="hv1", admin=True, **sections)
    return gateway(cfg)


def open_conn(uri, connections, readonly=False):
    fn = libvirt.openReadOnly if readonly else libvirt.open
    c = harness.call_with_timeout(fn, uri, timeout=30.0)
    connections.append(c)
    return c


def test_metrics_format_every_family_documented(shared_libvirtd, gateway):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    status, _, body = admin_request(gw, "GET", "/metrics")
    text = body.decode()
    fams = scrape(gw)
    for name, f in fams.items():
        assert name.startswith("virtmux_"), name
        assert f.documentation, name
        assert f.type in ("counter", "gauge", "histogram"), (name, f.type)
        assert "# TYPE %s" % name in text
    for family in ("virtmux_sessions", "virtmux_upstream_connections",
                   "virtmux_calls_in_flight", "virtmux_calls_queued",
                   "virtmux_call_duration_seconds", "virtmux_errors",
                   "virtmux_auth_failures", "virtmux_policy_denials",
                   "virtmux_event_registrations", "virtmux_event_subscribers",
                   "virtmux_event_subscribers_dropped", "virtmux_client_received_bytes",
                   "virtmux_client_sent_bytes", "virtmux_upstream_received_bytes",
                   "virtmux_upstream_sent_bytes", "virtmux_limit_hits"):
        assert family in fams, family
    # every limit the gateway enforces is there, at zero before any traffic
    limits = {s.labels["limit"] for s in fams["virtmux_limit_hits"].samples}
    assert {"max_clients", "max_unauthenticated", "max_unauthenticated_per_source",
            "auth_timeout", "queue_timeout", "max_inflight", "max_client_requests",
            "max_streams", "events_max_per_session", "events_max_queue_bytes",
            "frame_length"} <= limits
    # the unused upstream is listed with no connection at all
    for state in ("connecting", "handshake", "ready", "backoff"):
        assert sample(fams, "virtmux_upstream_connections", upstream="spare",
                      state=state) == 0
    assert sample(fams, "virtmux_calls_in_flight", upstream="spare") == 0


def test_call_histogram_counts_real_calls(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    conn = open_conn(gw.uri(), connections)
    dom = conn.lookupByName("test")
    before = scrape(gw)
    count0 = sample(before, "virtmux_call_duration_seconds", "_count",
                    upstream="hv1", procedure="DOMAIN_GET_INFO") or 0
    for _ in range(N_CALLS):
        dom.info()
    after = scrape(gw)
    count = sample(after, "virtmux_call_duration_seconds", "_count",
                   upstream="hv1", procedure="DOMAIN_GET_INFO")
    assert count == count0 + N_CALLS
    inf = sample(after, "virtmux_call_duration_seconds", "_bucket",
                 upstream="hv1", procedure="DOMAIN_GET_INFO", le="+Inf")
    assert inf == count
    assert sample(after, "virtmux_call_duration_seconds", "_sum",
                  upstream="hv1", procedure="DOMAIN_GET_INFO") > 0
    # buckets are cumulative and end at 10 s
    buckets = [s for s in after["virtmux_call_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["procedure"] == "DOMAIN_GET_INFO"]
    values = [s.value for s in buckets]
    assert values == sorted(values)
    assert [s.labels["le"] for s in buckets][:1] == ["0.0005"]
    assert [s.labels["le"] for s in buckets][-2:] == ["10", "+Inf"]
    # nothing went to the unused upstream
    assert total(after, "virtmux_call_duration_seconds", "_count", upstream="spare") == 0


def test_bytes_grow_with_traffic(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    conn = open_conn(gw.uri(), connections)
    before = scrape(gw)
    for _ in range(N_CALLS):
        conn.listAllDomains()
    after = scrape(gw)
    for family, labels in (("virtmux_client_received_bytes", {"listener": "tcp"}),
                           ("virtmux_client_sent_bytes", {"listener": "tcp"}),
                           ("virtmux_upstream_received_bytes", {"upstream": "hv1"}),
                           ("virtmux_upstream_sent_bytes", {"upstream": "hv1"})):
        # every call is a 28-byte header at least, each way
        grown = sample(after, family, "_total", **labels) - \
            sample(before, family, "_total", **labels)
        assert grown >= 28 * N_CALLS, (family, grown)
    assert sample(after, "virtmux_upstream_sent_bytes", "_total", upstream="spare") == 0


def test_sessions_gauge_matches_open_connections(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    assert wait_until(lambda: total(scrape(gw), "virtmux_sessions") == 0, 5.0)
    conns = [open_conn(gw.uri(), connections) for _ in range(3)]
    fams = scrape(gw)
    assert sample(fams, "virtmux_sessions", listener="tcp", identity="127.0.0.1@tcp") == 3
    assert total(fams, "virtmux_sessions") == 3
    assert sample(fams, "virtmux_upstream_connections", upstream="hv1", state="ready") >= 1
    assert sample(fams, "virtmux_upstream_session_refs", upstream="hv1") == 3
    conns[0].close()
    connections.remove(conns[0])
    assert wait_until(lambda: total(scrape(gw), "virtmux_sessions") == 2, 5.0)


def test_readonly_denial_counted(shared_libvirtd, gateway, connections):
    # the policy makes the client read-only: its library sends the call, the gateway refuses
    policy = {"default": "allow",
              "rules": [{"match": {"listener": "tcp"}, "readonly": True}]}
    gw = two_upstream_gateway(gateway, shared_libvirtd, policy=policy)
    conn = open_conn(gw.uri(), connections)
    dom = conn.lookupByName("test")
    before = scrape(gw)
    with pytest.raises(libvirt.libvirtError) as e:
        dom.destroy()
    assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    after = scrape(gw)
    identity = "127.0.0.1@tcp"
    assert sample(after, "virtmux_policy_denials", "_total", identity=identity,
                  procedure="DOMAIN_DESTROY", upstream="hv1") == \
        (sample(before, "virtmux_policy_denials", "_total", identity=identity,
                procedure="DOMAIN_DESTROY", upstream="hv1") or 0) + 1
    assert sample(after, "virtmux_errors", "_total", kind="denied") == \
        sample(before, "virtmux_errors", "_total", kind="denied") + 1
    # the refused call never reached libvirtd, so it has no latency sample
    assert total(after, "virtmux_call_duration_seconds", "_count",
                 procedure="DOMAIN_DESTROY") == 0


def test_upstream_errors_counted(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    conn = open_conn(gw.uri(), connections)
    before = scrape(gw)
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("no-such-domain")
    after = scrape(gw)
    assert sample(after, "virtmux_errors", "_total", kind="upstream") == \
        sample(before, "virtmux_errors", "_total", kind="upstream") + 1
    # a failed call is still a call, with its latency
    assert sample(after, "virtmux_call_duration_seconds", "_count", upstream="hv1",
                  procedure="DOMAIN_LOOKUP_BY_NAME") >= 1


def test_limit_hits_counted(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd, limits={"max_clients": 1})
    assert wait_until(lambda: gw.status()["sessions"] == 0, 5.0)
    before = scrape(gw)
    open_conn(gw.uri(), connections)       # the one client fills max_clients
    mid = scrape(gw)
    assert sample(mid, "virtmux_limit_hits", "_total", limit="max_clients") == \
        sample(before, "virtmux_limit_hits", "_total", limit="max_clients") + 1
    connections.pop().close()
    assert wait_until(lambda: gw.status()["sessions"] == 0, 5.0)
    # an illegal length word: the client is closed, counted as a limit and a protocol error
    with harness.RawClient(port=gw.port) as raw:
        raw.send(b"\xff\xff\xff\xff" + b"\0" * 28)
        raw.wait_closed(harness.scaled(5.0))
    after = scrape(gw)
    assert sample(after, "virtmux_limit_hits", "_total", limit="frame_length") == \
        sample(mid, "virtmux_limit_hits", "_total", limit="frame_length") + 1
    assert sample(after, "virtmux_errors", "_total", kind="protocol") == \
        sample(mid, "virtmux_errors", "_total", kind="protocol") + 1


def test_label_values_escaped(shared_libvirtd, gateway, connections):
    odd = 'odd "tcp" \\ listener\nline two'
    listeners = [{"name": odd, "address": "127.0.0.1:%d" % harness.free_port(),
                  "auth": "none"}]
    cfg = harness.make_config([harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
                              default_upstream="hv1", listeners=listeners, admin=True)
    gw = gateway(cfg)
    open_conn(gw.uri(), connections)
    fams = scrape(gw)   # the parser would fail on a bad escape
    assert sample(fams, "virtmux_sessions", listener=odd) == 1
    assert sample(fams, "virtmux_client_received_bytes", "_total", listener=odd) > 0


# --------------------------------------------------------------------------
# authentication failures (the auth tests' own fixtures)
# --------------------------------------------------------------------------


def test_sasl_failure_counted_by_listener_and_mechanism(env, shared_libvirtd, gateway,  # noqa: F811
                                                         connections):
    gw = gateway(sasl_config(env, [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)]))
    uris = Uris(gw, env)
    before = scrape(gw)
    err = open_error(uris.unix(), "alice", "not-the-password")
    assert err.get_error_code() == libvirt.VIR_ERR_AUTH_FAILED
    after = scrape(gw)
    grew = {s.labels["mechanism"]: s.value - sample(before, "virtmux_auth_failures", "_total",
                                                     **s.labels)
            for s in after["virtmux_auth_failures"].samples
            if s.labels["listener"] == "unixsasl"}
    assert sum(grew.values()) == 1, grew
    assert grew["SCRAM-SHA-256"] == 1, grew     # what libvirt picks from the offer
    assert total(after, "virtmux_auth_failures", "_total", listener="tlssasl") == 0
    assert sample(after, "virtmux_errors", "_total", kind="auth") >= 1
    # a good login afterwards: nothing more is counted
    connections.append(open_auth(uris.unix(), "alice", USERS["alice"]))
    assert total(scrape(gw), "virtmux_auth_failures", "_total") == \
        total(after, "virtmux_auth_failures", "_total")


def test_tls_certificate_refusal_counted(certs, shared_libvirtd, gateway):  # noqa: F811
    port = harness.free_port()
    cfg = harness.make_config([harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
                              default_upstream="hv1", listeners=[tls_listener(certs, port)],
                              admin=True)
    gw = gateway(cfg)
    before = sample(scrape(gw), "virtmux_auth_failures", "_total", listener="tls",
                    mechanism="tls")
    with pytest.raises(libvirt.libvirtError):
        harness.call_with_timeout(libvirt.open, tls_uri(port, certs["dir_mallory"]),
                                  timeout=30.0)
    assert wait_until(lambda: sample(scrape(gw), "virtmux_auth_failures", "_total",
                                     listener="tls", mechanism="tls") == before + 1, 5.0)


# --------------------------------------------------------------------------
# /status: every session and every configured upstream
# --------------------------------------------------------------------------


def status_of(gw, headers=None):
    code, hdrs, body = admin_request(gw, "GET", "/status", headers=headers)
    assert code == 200, body[:300]
    assert hdrs["content-type"] == "application/json"
    return json.loads(body)


def open_sessions(gw):
    return [s for s in status_of(gw)["session_list"] if s["state"] == "open"]


def test_status_lists_sessions(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    assert wait_until(lambda: gw.status()["sessions"] == 0, 5.0)
    conn = open_conn(gw.uri(), connections)
    for _ in range(3):
        conn.listAllDomains()
    with harness.RawClient(port=gw.port) as raw:
        raw.handshake()
        raw.list_all_domains()
        st = status_of(gw)
        # the fields the other tests rely on are all still there
        for key in ("sessions", "max_clients", "totals", "pools", "denials_total",
                    "denials", "unauthenticated"):
            assert key in st, key
        assert st["sessions"] == len(st["session_list"]) == 2
        local = "%s:%d" % raw.sock.getsockname()[:2]
        mine = [s for s in st["session_list"] if s["peer"] == local]
        assert len(mine) == 1, (local, st["session_list"])
        s = mine[0]
        assert s["identity"] == "127.0.0.1@tcp"
        assert s["listener"] == "tcp"
        assert s["upstream"] == "hv1"
        assert s["state"] == "open"
        assert s["calls"] == {"total": 1, "in_flight": 0}
        since = datetime.datetime.strptime(s["since"], "%Y-%m-%dT%H:%M:%SZ")
        now = datetime.datetime.utcnow()
        assert abs((now - since).total_seconds()) < 60, s["since"]
        other = [x for x in st["session_list"] if x["peer"] != local][0]
        assert other["calls"]["total"] >= 3
        assert other["id"] != s["id"]


def test_status_lists_every_configured_upstream(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    st = status_of(gw)
    ups = {u["name"]: u for u in st["upstreams"]}
    assert set(ups) == {"hv1", "spare"}
    for u in ups.values():     # nothing used yet
        assert (u["state"], u["connections"], u["refcounts"], u["inflight"], u["queued"]) == \
            ("idle", 0, 0, 0, 0), u
        assert u["last_error"] is None
    open_conn(gw.uri(), connections)
    ups = {u["name"]: u for u in status_of(gw)["upstreams"]}
    assert ups["hv1"]["state"] == "ready"
    assert ups["hv1"]["connections"] >= 1
    assert ups["hv1"]["connections_by_state"]["ready"] >= 1
    assert ups["hv1"]["refcounts"] == 1 and ups["hv1"]["sessions"] == 1
    assert ups["hv1"]["last_error"] is None
    assert ups["hv1"]["uri"] == shared_libvirtd.direct_uri
    assert (ups["spare"]["state"], ups["spare"]["connections"]) == ("idle", 0)


def test_status_shows_unreachable_upstream_error(shared_libvirtd, gateway):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    # nothing listens on spare's port: the open fails, and the error stays in the status
    # after the failed pool is gone
    with pytest.raises(libvirt.libvirtError):
        harness.call_with_timeout(libvirt.open, gw.uri("spare/default"), timeout=30.0)
    ups = {u["name"]: u for u in status_of(gw)["upstreams"]}
    assert ups["spare"]["connections"] == 0
    assert ups["spare"]["state"] in ("idle", "backoff")
    assert "refused" in (ups["spare"]["last_error"] or ""), ups["spare"]
    assert ups["hv1"]["state"] == "idle" and ups["hv1"]["last_error"] is None


# --------------------------------------------------------------------------
# POST /sessions/ID/disconnect
# --------------------------------------------------------------------------

def post(gw, path, headers=None):
    code, _, body = admin_request(gw, "POST", path, headers=headers, body=b"")
    return code, body


def test_disconnect_session(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    assert wait_until(lambda: gw.status()["sessions"] == 0, 5.0)
    victim = open_conn(gw.uri(), connections)
    victim.listAllDomains()
    [vs] = open_sessions(gw)
    other = open_conn(gw.uri(), connections)
    code, body = post(gw, "/sessions/%d/disconnect" % vs["id"])
    assert code == 200, body
    assert json.loads(body) == {"disconnected": vs["id"]}
    with pytest.raises(libvirt.libvirtError):
        harness.call_with_timeout(victim.listAllDomains, timeout=30.0)
    # the other session is untouched and keeps working
    assert [d.name() for d in other.listAllDomains()] == ["test"]
    assert wait_until(lambda: [s["id"] for s in open_sessions(gw)] != [] and
                      vs["id"] not in [s["id"] for s in open_sessions(gw)], 5.0)
    assert len(open_sessions(gw)) == 1
    # gone now: 404, and so for ids that never were
    code, body = post(gw, "/sessions/%d/disconnect" % vs["id"])
    assert code == 404
    assert "error" in json.loads(body)
    assert post(gw, "/sessions/999999/disconnect")[0] == 404
    assert post(gw, "/sessions/abc/disconnect")[0] == 404
    assert post(gw, "/sessions/-1/disconnect")[0] == 404


def test_action_paths_other_methods_405(shared_libvirtd, gateway, connections):
    gw = two_upstream_gateway(gateway, shared_libvirtd)
    open_conn(gw.uri(), connections)
    [s] = open_sessions(gw)
    path = "/sessions/%d/disconnect" % s["id"]
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        code, headers, _ = admin_request(gw, method, path)
        assert code == 405, method
        assert headers["allow"] == "POST"
    assert open_sessions(gw)[0]["id"] == s["id"]     # nothing happened to it
    assert post(gw, "/sessions/%d/nosuchverb" % s["id"])[0] == 404
    assert post(gw, "/nosuchnoun/1/disconnect")[0] == 404
    assert post(gw, "/sessions/%d/disconnect/more" % s["id"])[0] == 404


# --------------------------------------------------------------------------
# admin.token_file
# --------------------------------------------------------------------------

TOKEN = "s3cr3t-t0ken-for-the-admin-endpoint"


def token_file(tmp_path, mode=0o600, text=TOKEN + "\n"):
    path = tmp_path / "admin.token"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def token_gateway(gateway, lvd, path):
    admin = {"address": "127.0.0.1:%d" % harness.free_port(), "token_file": path}
    return admin_gateway(gateway, lvd, admin=admin)


BEARER = {"Authorization": "Bearer " + TOKEN}


def test_token_required_on_every_path(shared_libvirtd, gateway, tmp_path):
    gw = token_gateway(gateway, shared_libvirtd, token_file(tmp_path))
    for method, path in (("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/status"),
                         ("GET", "/metrics"), ("GET", "/"), ("GET", "/nosuch"),
                         ("POST", "/sessions/1/disconnect")):
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Bearer " + TOKEN[:-1]},
                        {"Authorization": "Bearer " + TOKEN + "x"},
                        {"Authorization": "Basic " + TOKEN}):
            code, hdrs, _ = admin_request(gw, method, path, headers=headers)
            assert code == 401, (method, path, headers)
            assert hdrs["www-authenticate"].startswith("Bearer"), hdrs
    code, _, body = admin_request(gw, "GET", "/healthz", headers=BEARER)
    assert (code, body) == (200, b"ok\n")
    assert status_of(gw, headers=BEARER)["sessions"] >= 0
    assert "virtmux_sessions" in scrape(gw, headers=BEARER)
    assert admin_request(gw, "GET", "/nosuch", headers=BEARER)[0] == 404
    assert admin_request(gw, "GET", "/healthz",
                         headers={"Authorization": "bearer " + TOKEN})[0] == 200


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_token_file_readable_by_others_refused(shared_libvirtd, tmp_path, mode):
    path = token_file(tmp_path, mode=mode)
    cfg = harness.make_config([harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
                              default_upstream="hv1",
                              admin={"address": "127.0.0.1:%d" % harness.free_port(),
                                     "token_file": path})
    r = harness.check_config(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "admin.token_file" in r.stderr and path in r.stderr, r.stderr
    gw = harness.Virtmux(cfg)
    try:
        with pytest.raises(harness.HarnessError):
            gw.start()
        assert gw.proc.returncode == 1
    finally:
        gw.cleanup()


@pytest.mark.parametrize("text", ["", "short\n", "has a space in it somewhere\n"])
def test_token_file_bad_token_refused(shared_libvirtd, tmp_path, text):
    path = token_file(tmp_path, text=text)
    cfg = harness.make_config([harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
                              default_upstream="hv1",
                              admin={"address": "127.0.0.1:%d" % harness.free_port(),
                                     "token_file": path})
    r = harness.check_config(cfg)
    assert r.returncode == 1 and "admin.token_file" in r.stderr, r.stderr


def test_token_file_missing_refused(shared_libvirtd, tmp_path):
    cfg = harness.make_config([harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
                              default_upstream="hv1",
                              admin={"address": "127.0.0.1:%d" % harness.free_port(),
                                     "token_file": str(tmp_path / "nope")})
    r = harness.check_config(cfg)
    assert r.returncode == 1
    assert "admin.token_file" in r.stderr and "No such file" in r.stderr, r.stderr


# --------------------------------------------------------------------------
# events: registrations, subscribers, deliveries, subscribers cut off
# --------------------------------------------------------------------------


EVENT_NAME = "metrics-" + "x" * 250     # ~330 bytes per lifecycle event


def event_domain(ctl):
    dom = ctl.defineXML("<domain type='test'><name>%s</name><memory>65536</memory>"
                        "<os><type>hvm</type></os></domain>" % EVENT_NAME)
    dom.create()
    return dom


def test_event_metrics(libvirtd, gateway, controller, event_clients, tmp_path):  # noqa: F811
    sock = str(tmp_path / "gw.sock")
    listeners = [{"name": "tcp", "auth": "none",
                  "address": "127.0.0.1:%d" % harness.free_port()},
                 {"name": "local", "auth": "none", "unix": sock}]
    cfg = harness.make_config([harness.upstream_entry("hv1", libvirtd.direct_uri)],
                              default_upstream="hv1", admin=True, listeners=listeners,
                              events={"max_queue_bytes": 65536})
    gw = gateway(cfg)
    dom = event_domain(controller(libvirtd))
    readers = event_clients()
    assert readers.open(gw.uri(), n=3)["errors"] == []
    fams = scrape(gw)
    assert sample(fams, "virtmux_event_registrations", upstream="hv1") == 1
    assert sample(fams, "virtmux_event_subscribers", upstream="hv1") == 3
    delivered0 = sample(fams, "virtmux_events_delivered", "_total", upstream="hv1")
    flip(dom, 2)
    assert readers.wait_counts(4, timeout=harness.scaled(10)) == [4] * 3
    assert sample(scrape(gw), "virtmux_events_delivered", "_total", upstream="hv1") == \
        delivered0 + 4 * 3

    # a subscriber that never reads (a unix socket buffers little) is cut off and counted
    slow = harness.RawClient(unix=sock)
    try:
        slow.handshake()
        assert harness.raw_register_event(slow) == 0
        assert sample(scrape(gw), "virtmux_event_subscribers", upstream="hv1") == 4

        def dropped():
            return sample(scrape(gw), "virtmux_event_subscribers_dropped", "_total",
                          upstream="hv1")
        for _ in range(30):
            if dropped():
                break
            flip(dom, 50)
        assert wait_until(lambda: dropped() == 1, 5.0)
        fams = scrape(gw)
        assert sample(fams, "virtmux_limit_hits", "_total",
                      limit="events_max_queue_bytes") == 1
        assert sample(fams, "virtmux_event_subscribers", upstream="hv1") == 3
    finally:
        slow.close()


# --------------------------------------------------------------------------
# calls in flight and queued; max_inflight and queue_timeout hits
# --------------------------------------------------------------------------

def test_inflight_queued_and_queue_timeout(libvirtd, gateway, connections):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", libvirtd.direct_uri, max_connections=1,
                                max_inflight=1)],
        default_upstream="hv1", admin=True,
        limits={"queue_timeout_ms": int(harness.scaled(1.0) * 1000)})
    gw = gateway(cfg)
    first = open_conn(gw.uri(), connections)
    second = open_conn(gw.uri(), connections)
    before = scrape(gw)
    libvirtd.sigstop()       # the one upstream connection's one slot stays taken
    try:
        stuck, stuck_res = harness.start_call(first.listAllDomains)
        assert wait_until(lambda: sample(scrape(gw), "virtmux_calls_in_flight",
                                         upstream="hv1") == 1, 5.0)
        # other arguments than the stuck call: an identical one would share it (pool.coalesce)
        waiting, waiting_res = harness.start_call(second.listAllDomains,
                                                  libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        assert wait_until(lambda: sample(scrape(gw), "virtmux_calls_queued",
                                         upstream="hv1") == 1, 5.0)
        # /status agrees: one call in flight, one queued, each session with one outstanding
        st = status_of(gw)
        [up] = [u for u in st["upstreams"] if u["name"] == "hv1"]
        assert (up["inflight"], up["queued"]) == (1, 1)
        assert sorted(x["calls"]["in_flight"] for x in st["session_list"]) == [1, 1]
        waiting.join(harness.scaled(10.0))
        assert isinstance(waiting_res.error, libvirt.libvirtError), waiting_res.error
        assert waiting_res.error.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT
    finally:
        libvirtd.sigcont()
    stuck.join(harness.scaled(10.0))
    assert stuck_res.error is None
    after = scrape(gw)
    for limit in ("max_inflight", "queue_timeout"):
        assert sample(after, "virtmux_limit_hits", "_total", limit=limit) == \
            sample(before, "virtmux_limit_hits", "_total", limit=limit) + 1, limit
    assert sample(after, "virtmux_errors", "_total", kind="timeout") == \
        sample(before, "virtmux_errors", "_total", kind="timeout") + 1
    assert sample(after, "virtmux_calls_in_flight", upstream="hv1") == 0
    assert sample(after, "virtmux_calls_queued", upstream="hv1") == 0
