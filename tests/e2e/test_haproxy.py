"""Scale-out behind a real HAProxy (issue "operations", part 5).

HAProxy (Debian's /usr/sbin/haproxy, in the foreground from a temporary config, loopback only)
balances TCP connections over two virtmux processes with `send-proxy-v2`, and checks each one
with `GET /healthz` on its admin endpoint. HAProxy connects from 127.0.0.2; the policy denies
that address, so every client that works proves the gateway took its source from the PROXY
header. Checked: virsh and libvirt-python through HAProxy; the client's own address and port
(not HAProxy's) in each gateway's logs and /status; killing one gateway sends new connections
to the other once the health check has marked it down.
"""

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

import harness
from harness import RawClient, wait_until

HAPROXY = "/usr/sbin/haproxy"
LB_SOURCE = "127.0.0.2"      # HAProxy's side of its connections to the gateways
DENIED = "127.0.0.3"         # a client address the policy refuses

pytestmark = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                reason="haproxy is not installed (scripts/deps.sh)")


class HAProxy:
    def __init__(self, port, servers):
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="virtmux-haproxy-")
        self.stats = os.path.join(self.dir, "stats.sock")
        self.cfg = os.path.join(self.dir, "haproxy.cfg")
        self.log = os.path.join(self.dir, "haproxy.log")
        lines = [
            "global",
            "    stats socket %s mode 600 level admin" % self.stats,
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "frontend libvirt",
            "    bind 127.0.0.1:%d" % port,
            "    default_backend gateways",
            "backend gateways",
            "    balance roundrobin",
            "    option httpchk",
            "    http-check send meth GET uri /healthz",
            "    http-check expect status 200",
            "    default-server inter 200ms fastinter 200ms downinter 200ms fall 2 rise 1",
        ]
        for name, addr, admin_port in servers:
            lines.append("    server %s %s send-proxy-v2 source %s check port %d"
                         % (name, addr, LB_SOURCE, admin_port))
        with open(self.cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        out = subprocess.run([HAPROXY, "-c", "-f", self.cfg], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.cfg],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        assert wait_until(lambda: harness.tcp_accepts("127.0.0.1", port), harness.scaled(10))

    def command(self, cmd):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self.stats)
            s.sendall(cmd.encode() + b"\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data.decode()
                data += chunk
        finally:
            s.close()

    def server_status(self):
        """{server name: "UP" / "DOWN" / ...} from `show stat`."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r["status"].split()[0] for r in rows
                if r["pxname"] == "gateways" and r["svname"] not in ("BACKEND", "FRONTEND")}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def gateway_config(lvd, name):
    cfg = harness.make_config(
        [harness.upstream_entry("hv1", lvd.direct_uri)], default_upstream="hv1",
        listeners=[{"name": name, "address": "127.0.0.1:%d" % harness.free_port(),
                    "auth": "none", "proxy_protocol": True}],
        admin=True)
    cfg["policy"] = {"default": "deny", "rules": [
        {"match": {"source": DENIED + "/32"}, "deny": True},
        {"match": {"source": "127.0.0.1/32"}, "upstreams": "*"}]}
    return cfg


@pytest.fixture
def cluster(shared_libvirtd, gateway):
    gws = [gateway(gateway_config(shared_libvirtd, "gw%d" % i)) for i in (1, 2)]
    lb = HAProxy(harness.free_port(),
                 [("gw%d" % i, "%s:%d" % (g.host, g.port),
                   harness.split_address(g.config["admin"]["address"])[1])
                  for i, g in enumerate(gws, 1)])
    try:
        assert wait_until(lambda: lb.server_status() == {"gw1": "UP", "gw2": "UP"},
                          harness.scaled(10)), lb.server_status()
        yield lb, gws
    finally:
        lb.cleanup()


def sessions(gw):
    n = gw.status()["sessions"]
    return n if isinstance(n, int) else len(n)


def test_clients_through_haproxy(cluster):
    libvirt = pytest.importorskip("libvirt")
    lb, gws = cluster
    uri = "test+tcp://127.0.0.1:%d/default" % lb.port
    r = harness.virsh(uri, "list", "--all", "--name")
    assert r.returncode == 0, r.stderr
    assert "test" in r.stdout
    # four libvirt-python connections, round robin: two on each gateway
    conns = [libvirt.open(uri) for _ in range(4)]
    try:
        assert all(c.listAllDomains() for c in conns)
        assert wait_until(lambda: [sessions(g) for g in gws] == [2, 2], harness.scaled(5)), \
            [g.status()["sessions"] for g in gws]
    finally:
        for c in conns:
            c.close()
    # HAProxy's own address never is the client's: nothing was denied as 127.0.0.2
    # (the policy denies every source but 127.0.0.1), and every session is a client's
    for g in gws:
        assert g.status()["denials_total"] == 0, g.status()["denials"]
        assert not re.search(r"C#\d+ %s" % re.escape(LB_SOURCE), g.log_text())


def test_real_source_shows_in_logs_and_status(cluster):
    lb, gws = cluster
    ports = []
    clients = [RawClient(port=lb.port) for _ in range(2)]   # one on each gateway (round robin)
    try:
        for c in clients:
            c.handshake()
            assert c.list_all_domains()
            ports.append(c.sock.getsockname()[1])
        # /status lists each gateway's sessions with their peer: the clients' own ports
        peers = []
        for g in gws:
            peers += [sess["peer"] for sess in g.status()["session_list"]]
        assert sorted(peers) == sorted("127.0.0.1:%d" % p for p in ports), peers
    finally:
        for c in clients:
            c.close()
    logs = [g.log_text() for g in gws]
    for port in ports:
        seen = [bool(re.search(r"C#\d+ 127\.0\.0\.1:%d: connected" % port, text))
                for text in logs]
        assert seen.count(True) == 1, (port, logs)
    assert all(re.search(r"C#\d+ 127\.0\.0\.1:\d+: connected", t) for t in logs), \
        "round robin should have given each gateway one client"
    # HAProxy's side (127.0.0.2) is only the carrier: the sessions are the clients'
    assert not any(re.search(r"C#\d+ %s" % re.escape(LB_SOURCE), t) for t in logs)
    # a client from another address is that address, in /status too (denials by identity)
    for _ in range(2):
        with RawClient(port=lb.port, source=DENIED) as c:
            c.auth_list()
            pkt = c.connect_open()
            assert pkt.status == harness.STATUS_ERROR
            assert "access denied" in harness.decode_error(pkt.payload)["message"]
    for g in gws:
        denials = str(g.status()["denials"])
        assert "%s@%s" % (DENIED, g.config["listeners"][0]["name"]) in denials, denials
        assert LB_SOURCE not in denials


def test_killing_one_gateway_sends_new_clients_to_the_other(cluster):
    lb, (gw1, gw2) = cluster
    uri = "test+tcp://127.0.0.1:%d/default" % lb.port
    gw1.kill()
    gw1.returncode = -9                  # killed on purpose: not a crash
    assert wait_until(lambda: lb.server_status().get("gw1") == "DOWN", harness.scaled(10)), \
        lb.server_status()
    before = gw2.log_text().count(": connected on listener")
    for _ in range(4):
        r = harness.virsh(uri, "list", "--all", "--name")
        assert r.returncode == 0, r.stderr
    assert gw2.log_text().count(": connected on listener") == before + 4
