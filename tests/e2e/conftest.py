"""pytest fixtures for the virtmux end-to-end suite.

Nothing is skipped: a missing libvirtd, virsh, python libvirt module or
virtmux binary is a test failure with a message that says what to do.
"""

import os
import re
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

try:
    import libvirt  # noqa: E402
except ImportError:  # pragma: no cover - reported by the fixture below
    libvirt = None


def _quiet_libvirt_errors(_ctx, _err):
    pass


if libvirt is not None:
    # the default handler prints every error to stderr; tests inspect the
    # exceptions instead
    libvirt.registerErrorHandler(_quiet_libvirt_errors, None)


# --------------------------------------------------------------------------
# prerequisites
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prerequisites():
    problems = []
    if libvirt is None:
        problems.append("python module 'libvirt' missing (python3-libvirt; "
                        "run the suite with /usr/bin/python3)")
    for path in (harness.LIBVIRTD, harness.VIRSH, harness.VIRT_ADMIN):
        if not os.access(path, os.X_OK):
            problems.append("%s missing (scripts/deps.sh)" % path)
    if os.geteuid() != 0:
        problems.append("the e2e suite runs libvirtd and must run as root")
    if problems:
        pytest.fail("e2e prerequisites missing:\n  " + "\n  ".join(problems),
                    pytrace=False)
    return True


@pytest.fixture(scope="session")
def virtmux_bin(prerequisites):
    binary = harness.virtmux_binary()
    if not os.access(str(binary), os.X_OK):
        pytest.fail("virtmux binary %s not found: run scripts/build.sh "
                    "(or set VIRTMUX_BUILD)" % binary, pytrace=False)
    return binary


# --------------------------------------------------------------------------
# failure reports: attach process logs to failing tests
# --------------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed:
        procs = []
        for node in item.listchain():
            procs.extend(getattr(node, "_e2e_processes", []))
        for proc in procs:
            try:
                if isinstance(proc, harness.Virtmux):
                    rep.sections.append(("virtmux log (%s)" % proc.log_path,
                                         proc.log_tail(80)))
                elif isinstance(proc, harness.Libvirtd):
                    state = ("running" if proc.running() else "exited with %s"
                             % (proc.proc.returncode if proc.proc else None))
                    rep.sections.append(
                        ("%s (%s, port %d) log" % (proc.name, state,
                                                   proc.port),
                         harness.tail(proc.out_path, 10)
                         + harness.tail(proc.log_path, 30)))
            except Exception as e:  # never hide the real failure
                rep.sections.append(("log error", repr(e)))


# --------------------------------------------------------------------------
# sanitizer reports: any report from a virtmux process fails the test
# --------------------------------------------------------------------------
#
# Every virtmux process writes its AddressSanitizer / LeakSanitizer / UBSan
# reports into a directory of its own test (or module, for gateways that
# module fixtures start), see harness.sanitizer_env. A test fails when a
# report appears in either while it runs or stops its processes; a module
# fails at teardown for its module gateways; the session fails for anything
# left. Without a sanitizer build no report is ever written.

_san = {"root": None, "seen": set()}


def _san_root():
    if _san["root"] is None:
        root = os.environ.get("VIRTMUX_SANITIZER_LOGS")
        if root:
            os.makedirs(root, exist_ok=True)
        else:
            root = tempfile.mkdtemp(prefix="virtmux-san-")
        _san["root"] = root
    return _san["root"]


def _san_dir(node):
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.nodeid)[-150:]
    path = os.path.join(_san_root(), name)
    os.makedirs(path, exist_ok=True)
    return path


def _san_new_reports(*dirs):
    found = []
    for d in dirs:
        for path, text in harness.sanitizer_reports(d):
            if path not in _san["seen"]:
                _san["seen"].add(path)
                found.append((path, text))
    return found


def _san_format(found):
    return "\n".join("--- %s ---\n%s" % (path, text[-30000:])
                     for path, text in found)


def _san_drop_if_empty(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


@pytest.fixture(scope="module", autouse=True)
def _sanitizer_module(request):
    path = _san_dir(request.node)
    harness.set_sanitizer_dir(path)
    yield path
    harness.set_sanitizer_dir(None)
    found = _san_new_reports(path)
    _san_drop_if_empty(path)
    if found:
        pytest.fail("sanitizer report(s) from a module's gateway:\n"
                    + _san_format(found), pytrace=False)


@pytest.fixture(autouse=True)
def _sanitizer_test(request, _sanitizer_module):
    path = _san_dir(request.node)
    harness.set_sanitizer_dir(path)
    yield path
    # the fixtures the test used are torn down by now: its gateways stopped
    harness.set_sanitizer_dir(_sanitizer_module)
    found = _san_new_reports(path, _sanitizer_module)
    _san_drop_if_empty(path)
    if found:
        pytest.fail("sanitizer report(s):\n" + _san_format(found),
                    pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    root = _san["root"]
    if root is None:
        return
    left = []
    for dirpath, _, _ in os.walk(root):
        left.extend(_san_new_reports(dirpath))
    if left:
        sys.stderr.write("\nsanitizer report(s) not tied to a test:\n%s\n"
                         % _san_format(left))
        session.exitstatus = 1
    if not os.environ.get("VIRTMUX_SANITIZER_LOGS") and not any(
            files for _, _, files in os.walk(root)):
        shutil.rmtree(root, ignore_errors=True)


def _register(request, proc):
    node = request.node
    lst = getattr(node, "_e2e_processes", None)
    if lst is None:
        lst = []
        node._e2e_processes = lst
    lst.append(proc)


def _start_libvirtd(request, **kw):
    lvd = harness.Libvirtd(**kw)
    request.addfinalizer(lvd.cleanup)
    lvd.start()
    _register(request, lvd)
    return lvd


# --------------------------------------------------------------------------
# libvirtd
# --------------------------------------------------------------------------

@pytest.fixture
def libvirtd(request, prerequisites):
    """A fresh libvirtd per test (start-up takes well under a second)."""
    return _start_libvirtd(request, name="libvirtd")


@pytest.fixture(scope="module")
def shared_libvirtd(request, prerequisites):
    """One libvirtd for a whole module whose tests do not change state."""
    return _start_libvirtd(request, name="shared-libvirtd")


@pytest.fixture
def libvirtd_factory(request, prerequisites):
    """Start a libvirtd with extra libvirtd.conf settings."""
    def make(name="libvirtd", **extra_conf):
        return _start_libvirtd(request, name=name, extra_conf=extra_conf)
    return make


@pytest.fixture
def two_libvirtd(request, prerequisites):
    return (_start_libvirtd(request, name="hv1"),
            _start_libvirtd(request, name="hv2"))


# --------------------------------------------------------------------------
# gateway
# --------------------------------------------------------------------------

class _GatewayFactory:
    def __init__(self, request, binary):
        self.request = request
        self.binary = binary
        self.started = []

    def __call__(self, config, **kw):
        gw = harness.Virtmux(config, binary=self.binary, **kw)
        self.started.append(gw)
        _register(self.request, gw)
        gw.start()
        return gw

    def single(self, upstream_uri, pool=None, limits=None, keepalive=None,
               name="hv1", listeners=None, **kw):
        """Gateway with one upstream that is also the default route."""
        cfg = harness.make_config(
            [harness.upstream_entry(name, upstream_uri, **(pool or {}))],
            default_upstream=name, listeners=listeners, limits=limits,
            keepalive=keepalive)
        return self(cfg, **kw)

    def finish(self):
        crashed = []
        for gw in self.started:
            if gw.proc is not None and gw.proc.poll() is not None \
                    and gw.returncode is None:
                # exited although nobody stopped it: a crash or fatal error
                crashed.append("virtmux exited unexpectedly with %s\n%s"
                               % (gw.proc.returncode, gw.log_tail(40)))
            gw.stop()
            found = harness.sanitizer_log_findings(gw.log_text())
            if found:
                crashed.append("sanitizer report in the virtmux log (%s):\n%s"
                               % (gw.log_path, found))
        for gw in self.started:
            gw.cleanup()
        return crashed


@pytest.fixture
def gateway(request, virtmux_bin):
    """Factory: gateway(config_dict) -> started harness.Virtmux.

    Also gateway.single(upstream_uri, pool=..., limits=...). Processes are
    stopped at teardown; a gateway that died during the test fails it."""
    factory = _GatewayFactory(request, virtmux_bin)
    yield factory
    crashed = factory.finish()
    if crashed:
        pytest.fail("\n".join(crashed), pytrace=False)


@pytest.fixture(scope="module")
def module_gateway_factory(request, prerequisites):
    binary = harness.virtmux_binary()
    if not os.access(str(binary), os.X_OK):
        pytest.fail("virtmux binary %s not found: run scripts/build.sh "
                    "(or set VIRTMUX_BUILD)" % binary, pytrace=False)
    factory = _GatewayFactory(request, binary)
    yield factory
    crashed = factory.finish()
    if crashed:
        pytest.fail("\n".join(crashed), pytrace=False)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

@pytest.fixture
def connections():
    """Collects libvirt connections and closes them at teardown (each close
    in a bounded thread so a broken gateway cannot hang the teardown)."""
    conns = []
    yield conns
    for c in conns:
        t, _ = harness.start_call(_close_quietly, c)
        t.join(5.0)


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:
        pass


@pytest.fixture
def event_clients():
    """Factory: event_clients() -> harness.EventClients, a child process
    with libvirt's default event loop holding libvirt-python connections;
    every child is ended at teardown."""
    made = []

    def make():
        ec = harness.EventClients()
        made.append(ec)
        return ec
    yield make
    for ec in made:
        try:
            ec.close()
        except Exception:
            ec.kill()


@pytest.fixture
def raw_subscribers():
    """Factory: raw_subscribers(port=...) -> harness.RawSubscriber; all are
    closed at teardown."""
    made = []

    def make(**kw):
        sub = harness.RawSubscriber(**kw)
        made.append(sub)
        return sub
    yield make
    for sub in made:
        sub.close()


@pytest.fixture(scope="module")
def storage_libvirtd(request, prerequisites):
    """One libvirtd per module that also loads libvirt's storage driver
    (storage+tcp://127.0.0.1:PORT/system, see Libvirtd.tcp_uri), in a
    mount namespace with a private /run/libvirt."""
    return _start_libvirtd(request, name="storage-libvirtd",
                           drivers=("storage",))
