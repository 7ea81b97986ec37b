"""Streams through the gateway: each stream rides a dedicated upstream
connection, opened for it and closed when it ends.

The test driver can take screenshots but has no volume upload/download; a
second libvirtd that also loads libvirt's storage driver
(``storage_libvirtd``, storage+tcp://.../system) moves real volume data, in
a transient dir pool under the test's temporary directory."""

import hashlib
import os
import re
import signal
import subprocess
import time

import libvirt
import pytest

import harness
from harness import RawClient, call_with_timeout, virsh, wait_until

MiB = 1 << 20
PROC_DOMAIN_SCREENSHOT = 211
VIR_ERR_OPERATION_DENIED = harness.VIR_ERR_OPERATION_DENIED


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

class LogCursor:
    """Reads what the gateway logged since the cursor was made."""

    def __init__(self, gw):
        self.gw = gw
        self.offset = len(gw.log_text())

    def text(self):
        return self.gw.log_text()[self.offset:]

    def streams(self):
        """[(session tag, procedure name, serial, link tag)] of the streams
        opened since; link tag is the dedicated connection ('U#7 hv1
        stream'), None if its first line is not logged yet."""
        lines = self.text().splitlines()
        out = []
        for i, ln in enumerate(lines):
            m = re.search(r"(C#\d+ \S+): stream (\S+) serial (\d+): opening "
                          r"a dedicated upstream connection", ln)
            if not m:
                continue
            link = None
            for later in lines[i + 1:]:
                lm = re.search(r"(U#\d+ \S+ stream): (connecting|ready)",
                               later)
                if lm:
                    link = lm.group(1)
                    break
            out.append((m.group(1), m.group(2), int(m.group(3)), link))
        return out

    def has(self, pattern):
        return re.search(pattern, self.text()) is not None


def stream_closed(cursor, stream):
    """The stream's dedicated connection was closed by the gateway."""
    _, _, _, link = stream
    return link is not None and cursor.has(re.escape(link) + r": closed: ")


def settled_nclients(lvd, uri):
    """libvirtd's client count once the gateway's pool has its link (a call
    through the gateway first): the baseline a stream adds one to."""
    ok(virsh(uri, "uri"))
    return lvd.nclients()


def wait_nclients(lvd, n, timeout=10.0):
    return wait_until(lambda: lvd.nclients() == n, timeout)


def vmrss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def ok(r):
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r


# --------------------------------------------------------------------------
# test driver: screenshots, refusals
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_gw(shared_libvirtd, module_gateway_factory):
    return module_gateway_factory(harness.make_config(
        [harness.upstream_entry("hv1", shared_libvirtd.direct_uri)],
        default_upstream="hv1", admin=True))


@pytest.fixture(scope="module")
def keeper(shared_libvirtd):
    """A direct connection for the whole module: the test driver's state
    (volumes made by one virsh run) lives as long as a connection does."""
    conn = call_with_timeout(libvirt.open, shared_libvirtd.direct_uri,
                             timeout=10)
    yield conn
    t, _ = harness.start_call(conn.close)
    t.join(5)


def test_screenshot_same_as_direct(shared_libvirtd, test_gw, keeper,
                                   tmp_path):
    lvd, gw = shared_libvirtd, test_gw
    direct_png = tmp_path / "direct.png"
    via_png = tmp_path / "via.png"
    direct = ok(virsh(lvd.direct_uri, "screenshot", "test",
                      str(direct_png)))
    base = settled_nclients(lvd, gw.uri())
    cursor = LogCursor(gw)
    via = ok(virsh(gw.uri(), "screenshot", "test", str(via_png)))
    assert via.stdout.replace("via.png", "direct.png") == direct.stdout
    assert via.stderr == direct.stderr == ""
    data = via_png.read_bytes()
    assert len(data) > 0
    assert data == direct_png.read_bytes()

    streams = cursor.streams()
    assert [s[1] for s in streams] == ["DOMAIN_SCREENSHOT"]
    assert wait_until(lambda: stream_closed(cursor, cursor.streams()[0]),
                      5.0), cursor.text()
    assert cursor.has(r"stream serial %d finished" % streams[0][2])
    assert wait_nclients(lvd, base), (lvd.nclients(), base)
    # the connection layer is fine afterwards
    assert ok(virsh(gw.uri(), "list", "--name")).stdout.split() == ["test"]


def _python_streams(uri):
    """Screenshot through libvirt-python's stream API, and the console and
    channel streams the test driver lacks."""
    conn = call_with_timeout(libvirt.open, uri, timeout=10)
    try:
        dom = conn.lookupByName("test")
        st = conn.newStream(0)
        mime = dom.screenshot(st, 0, 0)
        chunks = []
        while True:
            chunk = st.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        st.finish()
        refused = []
        for fn in (dom.openConsole, dom.openChannel):
            st = conn.newStream(0)
            try:
                fn(None, st, 0)
                refused.append("opened")
            except libvirt.libvirtError as e:
                refused.append((e.get_error_code(), e.get_error_domain(),
                                str(e)))
        return mime, b"".join(chunks), refused
    finally:
        conn.close()


def test_python_streams_same_as_direct(shared_libvirtd, test_gw, keeper):
    lvd, gw = shared_libvirtd, test_gw
    base = settled_nclients(lvd, gw.uri())
    cursor = LogCursor(gw)
    direct = call_with_timeout(_python_streams, lvd.direct_uri, timeout=30)
    via = call_with_timeout(_python_streams, gw.uri(), timeout=30)
    assert direct[0] == "image/png" and len(direct[1]) > 0
    assert via == direct
    assert [r[0] for r in via[2]] == [harness.VIR_ERR_NO_SUPPORT] * 2
    streams = cursor.streams()
    assert [s[1] for s in streams] == ["DOMAIN_SCREENSHOT",
                                       "DOMAIN_OPEN_CONSOLE",
                                       "DOMAIN_OPEN_CHANNEL"]
    for s in streams:
        assert wait_until(lambda: stream_closed(cursor, s), 5.0), \
            cursor.text()
    assert wait_nclients(lvd, base), (lvd.nclients(), base)


def test_screenshot_refused_to_readonly_client(shared_libvirtd, test_gw,
                                               keeper, tmp_path):
    lvd, gw = shared_libvirtd, test_gw
    cursor = LogCursor(gw)
    direct = virsh(lvd.direct_uri, "screenshot", "test",
                   str(tmp_path / "d.png"), readonly=True)
    via = virsh(gw.uri(), "screenshot", "test", str(tmp_path / "v.png"),
                readonly=True)
    assert direct.returncode == via.returncode == 1
    assert ("operation forbidden: read only access prevents "
            "virDomainScreenshot") in via.stderr
    assert via.stderr == direct.stderr
    assert not (tmp_path / "v.png").exists()
    # refused before any upstream connection was made for it
    assert cursor.streams() == []

    # the same on the wire, error code, domain and message
    def raw_screenshot(port):
        with RawClient(port=port) as c:
            c.handshake(readonly=True)
            dom = c.lookup_domain("test")
            pkt = c.call(PROC_DOMAIN_SCREENSHOT,
                         harness.xdr_domain(dom["name"], dom["uuid"],
                                            dom["id"])
                         + harness.xdr_u32(0) + harness.xdr_u32(0))
            assert pkt.status == harness.STATUS_ERROR
            # the session goes on
            assert [d["name"] for d in c.list_all_domains()] == ["test"]
            err = harness.decode_error(pkt.payload)
            return err["code"], err["domain"], err["message"]

    d, v = raw_screenshot(lvd.port), raw_screenshot(gw.port)
    assert v[0] == VIR_ERR_OPERATION_DENIED
    assert v == d
    assert cursor.streams() == []


def test_volume_streams_the_test_driver_lacks(shared_libvirtd, test_gw,
                                              keeper, tmp_path):
    """Upload/download against the test driver: libvirtd's own "not
    supported" answer to the stream-creating call reaches the client, and
    the dedicated connection is closed."""
    lvd, gw = shared_libvirtd, test_gw
    vol = "vmx-stream-vol"
    ok(virsh(gw.uri(), "vol-create-as", "default-pool", vol, "1M"))
    try:
        src = tmp_path / "src.bin"
        src.write_bytes(b"\x5a" * 4096)
        base = settled_nclients(lvd, gw.uri())
        cursor = LogCursor(gw)
        for op, api in (("vol-upload", "virStorageVolUpload"),
                        ("vol-download", "virStorageVolDownload")):
            target = str(src) if op == "vol-upload" \
                else str(tmp_path / ("%s.out" % op))
            direct = virsh(lvd.direct_uri, op, "--pool", "default-pool",
                           vol, target)
            via = virsh(gw.uri(), op, "--pool", "default-pool", vol, target)
            assert direct.returncode == via.returncode == 1
            assert ("this function is not supported by the connection "
                    "driver: %s" % api) in via.stderr, via.stderr
            assert via.stderr == direct.stderr
        streams = cursor.streams()
        assert [s[1] for s in streams] == ["STORAGE_VOL_UPLOAD",
                                           "STORAGE_VOL_DOWNLOAD"]
        for s in streams:
            assert wait_until(lambda: stream_closed(cursor, s), 5.0), \
                cursor.text()
            assert cursor.has(r"%s: stream serial %d finished"
                              % (re.escape(s[0]), s[2]))
        assert wait_nclients(lvd, base), (lvd.nclients(), base)
        assert vol in ok(virsh(gw.uri(), "vol-list", "default-pool")).stdout
    finally:
        virsh(gw.uri(), "vol-delete", "--pool", "default-pool", vol)


# --------------------------------------------------------------------------
# storage driver: real volume data
# --------------------------------------------------------------------------

class Storage:
    def __init__(self, lvd, gw, pool, pooldir):
        self.lvd = lvd
        self.gw = gw
        self.pool = pool
        self.pooldir = pooldir
        self.uri = gw.uri("system", driver="storage")
        self.direct_uri = lvd.tcp_uri("storage", "system")

    def vol_create(self, name, size, *extra):
        ok(virsh(self.uri, "vol-create-as", self.pool, name, size,
                 "--format", "raw", *extra))

    def vol_delete(self, name):
        virsh(self.uri, "vol-delete", "--pool", self.pool, name)


@pytest.fixture(scope="module")
def storage(storage_libvirtd, module_gateway_factory, tmp_path_factory):
    lvd = storage_libvirtd
    gw = module_gateway_factory(harness.make_config(
        [harness.upstream_entry("st", lvd.tcp_uri("storage", "system"))],
        default_upstream="st", admin=True))
    pooldir = tmp_path_factory.mktemp("pool")
    st = Storage(lvd, gw, "tpool", pooldir)
    # transient: nothing is written under /etc/libvirt
    ok(virsh(st.uri, "pool-create-as", st.pool, "dir", "--target",
             str(pooldir)))
    yield st
    virsh(st.direct_uri, "pool-destroy", st.pool)


def test_volume_upload_download_64mib(storage, tmp_path):
    st = storage
    up = tmp_path / "up.bin"
    with open(up, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    want = sha256_file(up)
    st.vol_create("v64", "64M")
    try:
        base = settled_nclients(st.lvd, st.uri)
        cursor = LogCursor(st.gw)
        ok(virsh(st.uri, "vol-upload", "--pool", st.pool, "v64", str(up),
                 timeout=120))
        # the bytes are in the volume's file
        assert os.path.getsize(st.pooldir / "v64") == 64 * MiB
        assert sha256_file(st.pooldir / "v64") == want
        down = tmp_path / "down.bin"
        ok(virsh(st.uri, "vol-download", "--pool", st.pool, "v64",
                 str(down), timeout=120))
        assert os.path.getsize(down) == 64 * MiB
        assert sha256_file(down) == want
        # and a direct download agrees
        direct = tmp_path / "direct.bin"
        ok(virsh(st.direct_uri, "vol-download", "--pool", st.pool, "v64",
                 str(direct), timeout=120))
        assert sha256_file(direct) == want

        streams = cursor.streams()
        assert [s[1] for s in streams] == ["STORAGE_VOL_UPLOAD",
                                           "STORAGE_VOL_DOWNLOAD"]
        for s in streams:
            assert wait_until(lambda: stream_closed(cursor, s), 5.0), \
                cursor.text()
        assert wait_nclients(st.lvd, base), (st.lvd.nclients(), base)
    finally:
        st.vol_delete("v64")


def test_client_killed_mid_download(storage, tmp_path):
    """virsh stops reading in the middle of a download, then is killed: the
    gateway holds little, other clients go on, and the stream's dedicated
    upstream connection is closed."""
    st = storage
    st.vol_create("big", "4G", "--allocation", "0")    # sparse
    out = tmp_path / "partial.bin"
    proc = None
    try:
        base = settled_nclients(st.lvd, st.uri)
        rss_before = vmrss_kib(st.gw.proc.pid)
        cursor = LogCursor(st.gw)
        proc = subprocess.Popen(
            [harness.VIRSH, "-c", st.uri, "vol-download", "--pool", st.pool,
             "big", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True)
        assert wait_until(lambda: out.exists()
                          and out.stat().st_size >= 8 * MiB, 20.0,
                          interval=0.005), "the download never got going"
        assert proc.poll() is None, "the download finished too soon"
        # the stream has its own upstream connection
        assert st.lvd.nclients() == base + 1
        streams = cursor.streams()
        assert [s[1] for s in streams] == ["STORAGE_VOL_DOWNLOAD"]

        # virsh stops reading: flow control holds the stream at both hops
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(1.0)
        size = out.stat().st_size
        time.sleep(1.0)
        assert out.stat().st_size == size
        # under AddressSanitizer freed memory sits in quarantine, so RSS
        # says nothing there (LeakSanitizer checks leaks at exit instead)
        if not harness.is_sanitized(st.gw.binary):
            grown = vmrss_kib(st.gw.proc.pid) - rss_before
            assert grown < 32 * 1024, "virtmux grew by %d KiB" % grown
        # while it is stuck, other clients are served
        t0 = time.monotonic()
        listing = ok(virsh(st.uri, "vol-list", st.pool, timeout=20))
        assert "big" in listing.stdout
        assert time.monotonic() - t0 < 10.0

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: stream_closed(cursor, cursor.streams()[0]),
                          10.0), cursor.text()
        session = streams[0][0]
        assert cursor.has(re.escape(session) + r": closed: ")
        assert wait_nclients(st.lvd, base), (st.lvd.nclients(), base)
        assert st.gw.running()
        status = st.gw.status()
        assert status["sessions"] == 0, status

        # and the next download works
        st.vol_create("small", "1M")
        small = tmp_path / "small.bin"
        ok(virsh(st.uri, "vol-download", "--pool", st.pool, "small",
                 str(small)))
        assert small.read_bytes() == b"\0" * MiB
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if out.exists():
            out.unlink()
        st.vol_delete("big")
        st.vol_delete("small")
