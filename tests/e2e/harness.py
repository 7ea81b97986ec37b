"""Process harness for virtmux end-to-end tests and benchmarks.

Three building blocks:

* ``Libvirtd``  - a private libvirtd (test driver only) listening on a
  loopback TCP port and on UNIX sockets in a temporary directory.
* ``Virtmux``   - the gateway binary started from the build directory with a
  JSON config written to a temporary file.
* ``RawClient`` - a minimal libvirt RPC client that talks raw packets, for
  hostile-input tests and protocol checks.

Nothing here depends on pytest, so scripts (benchmarks, demos) can import it.
Every wait is bounded; every process is started in its own session so that it
can be killed reliably.
"""

import errno
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import namedtuple
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

LIBVIRTD = os.environ.get("VIRTMUX_LIBVIRTD", "/usr/sbin/libvirtd")
VIRSH = shutil.which("virsh") or "/usr/bin/virsh"
VIRT_ADMIN = shutil.which("virt-admin") or "/usr/bin/virt-admin"
SYSTEM_DRIVER_DIR = os.environ.get(
    "VIRTMUX_DRIVER_DIR", "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver")

# --------------------------------------------------------------------------
# protocol constants
# --------------------------------------------------------------------------

REMOTE_PROGRAM = 0x20008086
REMOTE_VERSION = 1
KEEPALIVE_PROGRAM = 0x6B656570
KEEPALIVE_VERSION = 1

PROC_CONNECT_OPEN = 1
PROC_CONNECT_CLOSE = 2
PROC_DOMAIN_DESTROY = 12
PROC_DOMAIN_GET_INFO = 16
PROC_DOMAIN_LOOKUP_BY_NAME = 23
PROC_CONNECT_SUPPORTS_FEATURE = 60
PROC_AUTH_LIST = 66
PROC_CONNECT_LIST_ALL_DOMAINS = 273

PROC_KEEPALIVE_PING = 1
PROC_KEEPALIVE_PONG = 2

TYPE_CALL = 0
TYPE_REPLY = 1
TYPE_MESSAGE = 2
TYPE_STREAM = 3

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_CONTINUE = 2

HEADER_LEN = 24
LEN_WORD = 4
MIN_PACKET = LEN_WORD + HEADER_LEN          # 28
MAX_PACKET = LEN_WORD + 32 * 1024 * 1024    # 33554436

# error codes used by the tests (include/libvirt/virterror.h)
VIR_ERR_INTERNAL_ERROR = 1
VIR_ERR_NO_SUPPORT = 3
VIR_ERR_NO_CONNECT = 5
VIR_ERR_OPERATION_DENIED = 29
VIR_ERR_RPC = 39
VIR_ERR_OPERATION_TIMEOUT = 68


class HarnessError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# slower builds: time scale and sanitizer reports
# --------------------------------------------------------------------------

# A sanitizer (or valgrind) build runs several times slower: VIRTMUX_TIME_SCALE
# (scripts/test-asan.sh sets it) multiplies the waits that bound how long the
# gateway may take. It never shortens a wait, and the timings the gateway
# itself is configured with stay as the tests wrote them.
TIME_SCALE = max(1.0, float(os.environ.get("VIRTMUX_TIME_SCALE") or 1))


def scaled(seconds):
    """seconds times VIRTMUX_TIME_SCALE: the bound on a wait for the gateway."""
    return seconds * TIME_SCALE


# Where AddressSanitizer, LeakSanitizer and UBSan write their reports for the
# virtmux processes started from now on (the conftest sets one directory per
# test and fails a test whose directory holds a report). None: the
# environment is left alone and reports, if any, go to the process's log.
SANITIZER_DIR = None
LSAN_SUPPRESSIONS = REPO_ROOT / "scripts" / "lsan.supp"


def set_sanitizer_dir(path):
    global SANITIZER_DIR
    SANITIZER_DIR = path


_SANITIZER_MARKS = (": runtime error: ", "ERROR: AddressSanitizer",
                    "ERROR: LeakSanitizer", "WARNING: AddressSanitizer")


def sanitizer_log_findings(text, context=12):
    """The sanitizer reports written to a process's log (UBSan's always
    are): each marked line with the stack lines after it; "" if none."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if any(m in line for m in _SANITIZER_MARKS):
            out.extend(lines[i:i + context])
    return "\n".join(out)


def _with_options(env, key, ours):
    """Append our options to the caller's, so that ours win."""
    theirs = env.get(key)
    env[key] = "%s:%s" % (theirs, ours) if theirs else ours


def uses_sasl(config):
    """Whether a gateway config can run cyrus-sasl (a SASL listener or an
    upstream with SASL credentials)."""
    return ("sasl" in config
            or any("sasl" in (lst.get("auth") or "")
                   for lst in config.get("listeners", []))
            or any("sasl" in up for up in config.get("upstreams", [])))


def sanitizer_env(env=None, whole_stacks=False):
    """The environment for a virtmux process: `env` (default os.environ)
    plus sanitizer options that write every report into SANITIZER_DIR. A
    leak or an error makes the process exit non-zero; UBSan stops at the
    first report. Processes that are not sanitized ignore all of this.

    whole_stacks: record allocation stacks by DWARF unwinding instead of
    frame pointers (fast_unwind_on_malloc=0). The suppressions in
    LSAN_SUPPRESSIONS match frames of cyrus-sasl and OpenSSL, which are
    built without frame pointers, so a gateway that runs cyrus-sasl needs
    it; it makes every allocation costly (a SCRAM login about 30 times
    slower), so the others go without."""
    env = dict(os.environ if env is None else env)
    if not SANITIZER_DIR:
        return env
    # One log_path for both: with ASan and UBSan in one binary the runtimes
    # share it (UBSAN_OPTIONS is parsed last). UBSan's own reports still go
    # to stderr, i.e. the gateway's log: see sanitizer_log_findings.
    log_path = "log_path=%s/sanitizer" % SANITIZER_DIR
    _with_options(env, "ASAN_OPTIONS",
                  log_path + ":detect_leaks=1:abort_on_error=0:"
                  "fast_unwind_on_malloc=%d:strict_string_checks=1:"
                  "detect_stack_use_after_return=1:"
                  "check_initialization_order=1" % (0 if whole_stacks else 1))
    _with_options(env, "UBSAN_OPTIONS",
                  log_path + ":print_stacktrace=1:halt_on_error=1")
    if LSAN_SUPPRESSIONS.exists():
        _with_options(env, "LSAN_OPTIONS",
                      "suppressions=%s:print_suppressions=0"
                      % LSAN_SUPPRESSIONS)
    return env


def sanitizer_reports(directory):
    """[(path, text)] of the sanitizer reports in a directory."""
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith("sanitizer.") and os.path.isfile(path):
            with open(path, "r", errors="replace") as f:
                out.append((path, f.read()))
    return out


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_rng = random.Random(os.getpid() ^ int(time.time() * 1000))


def free_port(host="127.0.0.1"):
    """Return a TCP port that was free a moment ago.

    A port from bind-to-0 lies in the kernel's ephemeral range, where the
    many outgoing connections of a test run pick their local ports too, so
    one of them may take it before the server binds it. Prefer a port just
    below that range (checked by binding it), else fall back to bind-to-0.
    """
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(50):
            port = _rng.randrange(10000, low)
            if port_is_free(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def tcp_accepts(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_accepts(path, timeout=0.5):
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def split_address(addr):
    """'127.0.0.1:16509' or '[::1]:16509' -> (host, port)."""
    host, _, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise HarnessError("bad listener address %r" % addr)
    return host, int(port)


def tail(path, nlines=60):
    try:
        with open(path, "r", errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        return "<cannot read %s: %s>" % (path, e)
    return "".join(lines[-nlines:])


SETPRIV = shutil.which("setpriv")


def _die_with_parent(argv):
    """Prefix argv so the process gets SIGKILL when the thread that started
    it dies (prctl PR_SET_PDEATHSIG via util-linux setpriv): a harness killed
    by a timeout leaves no libvirtd or virtmux behind. Start processes from
    a thread that lives as long as they should (the main thread in tests)."""
    if SETPRIV and os.environ.get("VIRTMUX_E2E_NO_PDEATHSIG") != "1":
        return [SETPRIV, "--pdeathsig", "KILL", "--"] + argv
    return argv


def _wait_exit(proc, timeout):
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _signal_group(proc, sig):
    """Send sig to the process group of proc (it is a session leader)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# libvirtd
# --------------------------------------------------------------------------

class Libvirtd:
    """A private libvirtd serving the built-in test driver.

    The QEMU and other loadable drivers are disabled by pointing
    LIBVIRT_DRIVER_DIR at an empty directory; ``test:///default`` is served by
    the test driver built into libvirt.so. ``drivers=("storage",)`` puts
    symlinks to those system drivers into that directory (``tcp_uri``).
    """

    def __init__(self, port=None, extra_conf=None, name="libvirtd",
                 start_timeout=20.0, drivers=(), env=None, host="127.0.0.1"):
        self.name = name
        # the loopback address it listens on: every 127.x.y.z is loopback on
        # Linux, so many daemons can share one port (the fleet test)
        self.host = host
        # extra environment for the daemon, e.g. SASL_CONF_PATH
        self.extra_env = dict(env or {})
        # loadable drivers to offer besides the built-in test driver, by
        # short name ("storage" -> libvirt_driver_storage.so): each is
        # symlinked into the otherwise empty LIBVIRT_DRIVER_DIR
        self.drivers = tuple(drivers)
        self.tmpdir = tempfile.mkdtemp(prefix="virtmux-%s-" % name)
        self.rundir = os.path.join(self.tmpdir, "run")
        self.driverdir = os.path.join(self.tmpdir, "drivers")
        os.makedirs(self.rundir)
        os.makedirs(self.driverdir)
        self.conf_path = os.path.join(self.tmpdir, "libvirtd.conf")
        self.pid_path = os.path.join(self.tmpdir, "libvirtd.pid")
        self.log_path = os.path.join(self.tmpdir, "libvirtd.log")
        self.out_path = os.path.join(self.tmpdir, "libvirtd.out")
        self.port = port or free_port(host)
        self.extra_conf = dict(extra_conf or {})
        self.start_timeout = start_timeout
        self.sock = os.path.join(self.rundir, "libvirt-sock")
        self.sock_ro = os.path.join(self.rundir, "libvirt-sock-ro")
        self.admin_sock = os.path.join(self.rundir, "libvirt-admin-sock")
        self.admin_uri = "libvirtd:///system?socket=%s" % self.admin_sock
        self.direct_uri = "test+tcp://%s:%d/default" % (host, self.port)
        self.unix_uri = "test+unix:///default?socket=%s" % self.sock
        self.proc = None
        self._stopped_by_signal = False

    # -- configuration ----------------------------------------------------

    @staticmethod
    def _conf_value(v):
        if isinstance(v, (list, tuple)):
            return "[%s]" % ", ".join(Libvirtd._conf_value(x) for x in v)
        if isinstance(v, bool):
            return "1" if v else "0"
        if isinstance(v, int):
            return str(v)
        return '"%s"' % v

    def write_config(self):
        conf = {
            "listen_tls": 0,
            "listen_tcp": 1,
            "listen_addr": self.host,
            "tcp_port": str(self.port),
            "auth_tcp": "none",
            "auth_unix_rw": "none",
            "auth_unix_ro": "none",
            "unix_sock_dir": self.rundir,
            "log_outputs": "3:file:%s" % self.log_path,
        }
        conf.update(self.extra_conf)
        with open(self.conf_path, "w") as f:
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, self._conf_value(v)))

    # -- lifecycle --------------------------------------------------------

    def start(self):
        self.spawn()
        return self.wait_ready()

    def spawn(self):
        """Start the daemon without waiting for it (many at once: spawn
        each, then wait_ready each). Call from the thread that lives as long
        as the daemon should (see _die_with_parent)."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("%s already running" % self.name)
        if not os.access(LIBVIRTD, os.X_OK):
            raise HarnessError("libvirtd binary not found at %s "
                               "(install libvirt-daemon, see scripts/deps.sh)"
                               % LIBVIRTD)
        self.write_config()
        self._link_drivers()
        env = dict(os.environ)
        env["LIBVIRT_DRIVER_DIR"] = self.driverdir
        env.update(self.extra_env)
        argv = [LIBVIRTD, "--listen", "--config", self.conf_path,
                "--pid-file", self.pid_path]
        if self.drivers:
            argv = self._private_run_dir(argv)
        out = open(self.out_path, "ab")
        try:
            self.proc = subprocess.Popen(
                _die_with_parent(argv),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, cwd=self.tmpdir)
        finally:
            out.close()
        self._spawned_at = time.monotonic()
        return self

    def wait_ready(self):
        deadline = self._spawned_at + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    "%s exited with %s during start-up\n--- output ---\n%s"
                    "\n--- log ---\n%s" % (self.name, self.proc.returncode,
                                           tail(self.out_path),
                                           tail(self.log_path)))
            if (tcp_accepts(self.host, self.port)
                    and unix_accepts(self.sock)
                    and os.path.exists(self.admin_sock)):
                return self
            time.sleep(0.05)
        self.kill9()
        raise HarnessError("%s did not accept on port %d within %.0f s\n%s"
                           % (self.name, self.port, self.start_timeout,
                              tail(self.out_path)))

    def _link_drivers(self):
        for drv in self.drivers:
            so = "libvirt_driver_%s.so" % drv
            src = os.path.join(SYSTEM_DRIVER_DIR, so)
            if not os.path.exists(src):
                raise HarnessError("driver %s not found (package "
                                   "libvirt-daemon-driver-%s?)" % (src, drv))
            dst = os.path.join(self.driverdir, so)
            if not os.path.lexists(dst):
                os.symlink(src, dst)

    @staticmethod
    def _private_run_dir(argv):
        """Run argv in a mount namespace of its own with an empty tmpfs on
        /run/libvirt: a stateful driver (storage) takes a machine-wide
        lock and keeps its state there (/run/libvirt/storage), so two such
        daemons could not run at once and a test's transient pools would
        outlive it."""
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        script = ("mkdir -p /run/libvirt && "
                  "mount -t tmpfs -o mode=0755 virtmux-e2e /run/libvirt && "
                  'exec "$@"')
        return [unshare, "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", script, "sh"] + argv

    def tcp_uri(self, driver="test", path="default"):
        """Direct URI of this libvirtd for a driver, e.g.
        tcp_uri("storage", "system") -> storage+tcp://127.0.0.1:PORT/system
        (needs drivers=("storage",))."""
        return "%s+tcp://%s:%d/%s" % (driver, self.host, self.port, path)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            # a stopped process only acts on SIGTERM once continued
            _signal_group(self.proc, signal.SIGCONT)
            if not _wait_exit(self.proc, timeout):
                _signal_group(self.proc, signal.SIGKILL)
                _wait_exit(self.proc, 5.0)
        return self.proc.returncode

    def kill9(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)
            _wait_exit(self.proc, 10.0)

    def restart(self):
        """Start again on the same port with the same directories."""
        self.stop()
        return self.start()

    def sigstop(self):
        if self.running():
            _signal_group(self.proc, signal.SIGSTOP)

    def sigcont(self):
        if self.running():
            _signal_group(self.proc, signal.SIGCONT)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # -- introspection ----------------------------------------------------

    def log_text(self):
        parts = []
        for p in (self.out_path, self.log_path):
            try:
                with open(p, "r", errors="replace") as f:
                    parts.append(f.read())
            except OSError:
                pass
        return "\n".join(parts)

    def _virt_admin(self, *args, timeout=10.0):
        try:
            r = subprocess.run([VIRT_ADMIN, "-c", self.admin_uri] + list(args),
                               stdin=subprocess.DEVNULL,
                               capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError("virt-admin %s timed out" % " ".join(args))
        return r

    def client_ids(self):
        r = self._virt_admin("srv-clients-list", "libvirtd")
        if r.returncode != 0:
            raise HarnessError("virt-admin srv-clients-list failed: %s"
                               % r.stderr.strip())
        ids = []
        for line in r.stdout.splitlines():
            fields = line.split()
            if fields and fields[0].isdigit():
                ids.append(int(fields[0]))
        return ids

    def clients(self):
        """One dict per client socket of the ``libvirtd`` server.

        Keys are those printed by ``virt-admin client-info`` (id, transport,
        readonly, sock_addr, unix_user_id, ...). A client that disconnects
        between the listing and the query is left out.
        """
        result = []
        for cid in self.client_ids():
            r = self._virt_admin("client-info", "libvirtd", str(cid))
            if r.returncode != 0:
                continue
            info = {}
            for line in r.stdout.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    info[key.strip()] = value.strip()
            if info:
                result.append(info)
        return result

    def nclients(self):
        r = self._virt_admin("srv-clients-info", "libvirtd")
        if r.returncode != 0:
            raise HarnessError("virt-admin srv-clients-info failed: %s"
                               % r.stderr.strip())
        for line in r.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "nclients":
                return int(value.strip())
        raise HarnessError("no nclients in: %r" % r.stdout)


# --------------------------------------------------------------------------
# virtmux
# --------------------------------------------------------------------------

def build_dir():
    return Path(os.environ.get("VIRTMUX_BUILD", str(REPO_ROOT / "build")))


def virtmux_binary():
    return build_dir() / "proxy" / "virtmux"


def is_sanitized(binary=None):
    """Whether the virtmux binary was built with AddressSanitizer (its
    memory use then says nothing about leaks; LeakSanitizer does)."""
    path = Path(binary) if binary else virtmux_binary()
    with open(str(path), "rb") as f:
        return b"__asan_init" in f.read()


def upstream_entry(name, uri, **pool):
    entry = {"name": name, "uri": uri}
    if pool:
        entry["pool"] = pool
    return entry


def make_config(upstreams, default_upstream=None, listeners=None,
                limits=None, keepalive=None, **sections):
    """Build a gateway config; without listeners, one TCP listener on a
    free loopback port is created. Other top-level sections (events=...,
    admin=..., log=...) are passed through as given; admin=True means an
    admin endpoint on a free loopback port."""
    if listeners is None:
        listeners = [{"name": "tcp", "address": "127.0.0.1:%d" % free_port(),
                      "auth": "none"}]
    cfg = {"listeners": listeners, "upstreams": upstreams}
    if default_upstream is not None:
        cfg["default_upstream"] = default_upstream
    if limits is not None:
        cfg["limits"] = limits
    if keepalive is not None:
        cfg["keepalive"] = keepalive
    for key, value in sections.items():
        if key == "admin" and value is True:
            value = {"address": "127.0.0.1:%d" % free_port()}
        if value is not None:
            cfg[key] = value
    return cfg


class Virtmux:
    """The gateway process."""

    def __init__(self, config, binary=None, extra_args=(), start_timeout=10.0,
                 verbose=True, env=None):
        self.config = config
        self.env = env  # extra environment (e.g. KRB5_CONFIG), or None
        # -v (debug logging) overrides the config's log.level; benchmarks
        # pass verbose=False so that the configured level applies
        self.verbose = verbose
        self.binary = Path(binary) if binary else virtmux_binary()
        self.extra_args = list(extra_args)
        self.start_timeout = scaled(start_timeout)
        self.tmpdir = tempfile.mkdtemp(prefix="virtmux-gw-")
        self.config_path = os.path.join(self.tmpdir, "virtmux.json")
        self.log_path = os.path.join(self.tmpdir, "virtmux.log")
        self.proc = None
        self.returncode = None

    # -- addresses --------------------------------------------------------

    def tcp_listeners(self):
        out = []
        for lst in self.config.get("listeners", []):
            if "address" in lst:
                out.append(split_address(lst["address"]))
        return out

    def unix_listeners(self):
        return [lst["unix"] for lst in self.config.get("listeners", [])
                if "unix" in lst]

    @property
    def port(self):
        tl = self.tcp_listeners()
        if not tl:
            raise HarnessError("gateway has no TCP listener")
        return tl[0][1]

    @property
    def host(self):
        return self.tcp_listeners()[0][0]

    def status(self, timeout=5.0):
        """GET /status from the admin endpoint (config "admin.address")."""
        addr = (self.config.get("admin") or {}).get("address")
        if not addr:
            raise HarnessError("gateway config has no admin.address")
        return admin_status(addr, timeout=timeout)

    def metrics_text(self, timeout=10.0):
        """GET /metrics from the admin endpoint, as text."""
        addr = (self.config.get("admin") or {}).get("address")
        if not addr:
            raise HarnessError("gateway config has no admin.address")
        status, body = admin_get(addr, "/metrics", timeout=scaled(timeout))
        if status != 200:
            raise HarnessError("GET /metrics: HTTP %d %r" % (status, body[:200]))
        return body.decode()

    def admin(self, method, path, timeout=5.0):
        """An admin endpoint request, e.g. admin("POST",
        "/upstreams/hv1/pause") -> (HTTP status, JSON body or None)."""
        addr = (self.config.get("admin") or {}).get("address")
        if not addr:
            raise HarnessError("gateway config has no admin.address")
        return admin_request(addr, method, path, timeout=timeout)

    def upstream_action(self, name, action, timeout=5.0):
        """POST /upstreams/NAME/ACTION; fails unless the answer is 200 with
        the upstream's new state, which it returns."""
        code, body = self.admin("POST", "/upstreams/%s/%s" % (name, action),
                                timeout=timeout)
        if code != 200 or not body or body.get("upstream") != name:
            raise HarnessError("POST /upstreams/%s/%s: HTTP %d %r"
                               % (name, action, code, body))
        return body["state"]

    def event_counts(self, timeout=5.0):
        """(event_registrations, event_subscribers) summed over all pools."""
        return pool_event_counts(self.status(timeout=timeout))

    def uri(self, path="default", driver="test"):
        """Client URI through the first TCP listener, e.g.
        uri('hv2/default') -> test+tcp://127.0.0.1:PORT/hv2/default."""
        return "%s+tcp://%s:%d/%s" % (driver, self.host, self.port, path)

    def unix_uri(self, index=0, path="default", driver="test"):
        return "%s+unix:///%s?socket=%s" % (driver, path,
                                            self.unix_listeners()[index])

    # -- lifecycle --------------------------------------------------------

    def start(self):
        if not os.access(str(self.binary), os.X_OK):
            raise HarnessError(
                "virtmux binary not found at %s: build it first "
                "(scripts/build.sh) or set VIRTMUX_BUILD" % self.binary)
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=2)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                _die_with_parent([str(self.binary), "--config",
                                  self.config_path]
                                 + (["-v"] if self.verbose else [])
                                 + self.extra_args),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.tmpdir,
                env=sanitizer_env(dict(os.environ, **(self.env or {})),
                                  whole_stacks=uses_sasl(self.config)))
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError("virtmux exited with %s during start-up\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            if all(tcp_accepts(h, p) for h, p in self.tcp_listeners()) and \
                    all(unix_accepts(u) for u in self.unix_listeners()):
                return self
            time.sleep(0.05)
        self.kill()
        raise HarnessError("virtmux listeners not ready within %.0f s\n%s"
                           % (self.start_timeout, self.log_tail()))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0, sig=signal.SIGTERM):
        """SIGTERM (or sig), wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            _signal_group(self.proc, sig)
            # a sanitized gateway checks for leaks on its way out
            if not _wait_exit(self.proc, scaled(timeout)):
                _signal_group(self.proc, signal.SIGKILL)
                _wait_exit(self.proc, 5.0)
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGKILL)
            _wait_exit(self.proc, 5.0)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # -- logs -------------------------------------------------------------

    def log_text(self):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, nlines=60):
        return tail(self.log_path, nlines)


def check_config(config_or_path, binary=None, timeout=10.0):
    """Run ``virtmux --check-config``; config may be a dict, a string (raw
    file content) or an existing path. Returns CompletedProcess."""
    binary = Path(binary) if binary else virtmux_binary()
    if not os.access(str(binary), os.X_OK):
        raise HarnessError("virtmux binary not found at %s" % binary)
    tmp = None
    if isinstance(config_or_path, (dict, list)):
        fd, tmp = tempfile.mkstemp(prefix="virtmux-check-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config_or_path, f)
        path = tmp
    elif isinstance(config_or_path, str) and not os.path.exists(config_or_path):
        fd, tmp = tempfile.mkstemp(prefix="virtmux-check-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(config_or_path)
        path = tmp
    else:
        path = str(config_or_path)
    try:
        return subprocess.run([str(binary), "--check-config", path],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=scaled(timeout),
                              env=sanitizer_env())
    finally:
        if tmp:
            os.unlink(tmp)


# --------------------------------------------------------------------------
# bounded waiting
# --------------------------------------------------------------------------

class CallResult:
    def __init__(self):
        self.value = None
        self.error = None
        self.start = None
        self.end = None

    @property
    def elapsed(self):
        return None if self.end is None else self.end - self.start


def start_call(fn, *args, **kw):
    """Run fn in a daemon thread; returns (thread, CallResult). A call that
    never returns leaves a daemon thread behind instead of hanging."""
    res = CallResult()
    started = threading.Event()

    def run():
        res.start = time.monotonic()
        started.set()
        try:
            res.value = fn(*args, **kw)
        except BaseException as e:  # recorded for the caller
            res.error = e
        finally:
            res.end = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(5.0)
    return t, res


def call_with_timeout(fn, *args, timeout=30.0, **kw):
    """fn(*args) in a daemon thread; AssertionError if it does not return
    within timeout, else its value (or its exception re-raised)."""
    t, res = start_call(fn, *args, **kw)
    t.join(timeout)
    if t.is_alive():
        raise AssertionError("%s did not return within %.0f s"
                             % (getattr(fn, "__name__", fn), timeout))
    if res.error is not None:
        raise res.error
    return res.value


def wait_until(predicate, timeout=5.0, interval=0.05):
    """Poll predicate until it returns a true value or timeout passes;
    returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------
# virsh
# --------------------------------------------------------------------------

def virsh(uri, *args, readonly=False, timeout=30.0):
    """Run virsh; returns CompletedProcess (text)."""
    cmd = [VIRSH]
    if readonly:
        cmd.append("-r")
    cmd += ["-c", uri] + list(args)
    env = dict(os.environ)
    env.setdefault("LC_ALL", "C")
    env.pop("VIRSH_DEFAULT_CONNECT_URI", None)
    env.pop("LIBVIRT_DEFAULT_URI", None)
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise HarnessError("virsh %s timed out after %.0f s"
                           % (" ".join(cmd[1:]), timeout)) from e


# --------------------------------------------------------------------------
# XDR and raw packets
# --------------------------------------------------------------------------

def xdr_u32(v):
    return struct.pack(">I", v & 0xFFFFFFFF)


def xdr_i32(v):
    return struct.pack(">i", v)


def xdr_u64(v):
    return struct.pack(">Q", v)


def xdr_opaque_fixed(b):
    pad = (-len(b)) % 4
    return bytes(b) + b"\0" * pad


def xdr_string(s):
    b = s.encode() if isinstance(s, str) else bytes(s)
    return xdr_u32(len(b)) + xdr_opaque_fixed(b)


def xdr_opt_string(s):
    if s is None:
        return xdr_u32(0)
    return xdr_u32(1) + xdr_string(s)


def xdr_domain(name, uuid, dom_id):
    """remote_nonnull_domain: string name, opaque uuid[16], int id."""
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    return xdr_string(name) + bytes(uuid) + xdr_i32(dom_id)


class XdrReader:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def _take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("XDR underflow at %d (+%d of %d)"
                             % (self.pos, n, len(self.data)))
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self):
        return struct.unpack(">I", self._take(4))[0]

    def i32(self):
        return struct.unpack(">i", self._take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self._take(8))[0]

    def opaque_fixed(self, n):
        b = self._take(n)
        self._take((-n) % 4)
        return b

    def string(self):
        n = self.u32()
        return self.opaque_fixed(n).decode(errors="replace")

    def opt_string(self):
        return self.string() if self.u32() else None

    def domain(self):
        name = self.string()
        uuid = self.opaque_fixed(16)
        dom_id = self.i32()
        return {"name": name, "uuid": uuid, "id": dom_id}

    def remaining(self):
        return len(self.data) - self.pos


Packet = namedtuple("Packet",
                    "length prog vers proc type serial status payload")


def build_packet(prog, vers, proc, mtype, serial, status=STATUS_OK,
                 payload=b""):
    body = struct.pack(">IIiiIi", prog, vers, proc, mtype, serial, status) \
        + bytes(payload)
    return struct.pack(">I", len(body) + LEN_WORD) + body


def parse_packet(raw):
    length = struct.unpack(">I", raw[:4])[0]
    prog, vers, proc, mtype, serial, status = struct.unpack(">IIiiIi",
                                                            raw[4:28])
    return Packet(length, prog, vers, proc, mtype, serial, status,
                  bytes(raw[28:length]))


def decode_error(payload):
    """virNetMessageError -> dict(code, domain, message, level, str1..3)."""
    r = XdrReader(payload)
    err = {"code": r.i32(), "domain": r.i32(), "message": r.opt_string(),
           "level": r.i32()}
    # the rest is optional on the wire for robustness: decode what is there
    try:
        if r.u32():                 # dom (always absent in practice)
            r.domain()
        err["str1"] = r.opt_string()
        err["str2"] = r.opt_string()
        err["str3"] = r.opt_string()
        err["int1"] = r.i32()
        err["int2"] = r.i32()
    except ValueError:
        pass
    return err


class ConnectionClosed(Exception):
    pass


class RawClient:
    """A socket speaking raw libvirt RPC packets."""

    def __init__(self, host="127.0.0.1", port=None, unix=None, timeout=5.0,
                 rcvbuf=None, source=None):
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        elif rcvbuf:
            # a small receive buffer, set before connecting so that the
            # advertised window stays small (a client that does not read)
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        else:
            # source: a local address to connect from (another loopback
            # address stands for another client machine)
            self.sock = socket.create_connection(
                (host, port), timeout=timeout,
                source_address=(source, 0) if source else None)
        self.timeout = timeout
        self.serial = 0
        self._buf = b""
        self.messages = []   # MESSAGE packets seen while waiting for replies
        self.stream_packets = []  # STREAM packets that came before their REPLY

    # -- plumbing ---------------------------------------------------------

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def send_slowly(self, data, chunk=1, delay=0.01):
        for i in range(0, len(data), chunk):
            self.sock.sendall(data[i:i + chunk])
            time.sleep(delay)

    def send_packet(self, prog, vers, proc, mtype, serial, status=STATUS_OK,
                    payload=b""):
        self.send(build_packet(prog, vers, proc, mtype, serial, status,
                               payload))

    def next_serial(self):
        s = self.serial
        self.serial += 1
        return s

    def _recv_some(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out waiting for data")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ConnectionClosed("peer closed the connection")
        self._buf += chunk

    def recv_packet(self, timeout=None):
        """Read one whole packet. Raises socket.timeout or ConnectionClosed."""
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else self.timeout)
        while len(self._buf) < 4:
            self._recv_some(deadline)
        length = struct.unpack(">I", self._buf[:4])[0]
        if length < MIN_PACKET or length > MAX_PACKET:
            raise ValueError("peer sent a bad length word %d" % length)
        while len(self._buf) < length:
            self._recv_some(deadline)
        raw, self._buf = self._buf[:length], self._buf[length:]
        return parse_packet(raw)

    def wait_closed(self, timeout=2.0):
        """True if the peer closes within timeout (packets before the close
        are collected and returned via self.drained)."""
        self.drained = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    return True
                raise
            if not chunk:
                return True
            self._buf += chunk
            while len(self._buf) >= 4:
                length = struct.unpack(">I", self._buf[:4])[0]
                if length < MIN_PACKET or len(self._buf) < length:
                    break
                self.drained.append(parse_packet(self._buf[:length]))
                self._buf = self._buf[length:]

    # -- calls ------------------------------------------------------------

    def call(self, proc, payload=b"", prog=REMOTE_PROGRAM,
             vers=REMOTE_VERSION, timeout=None, stream=False):
        """Send a CALL and return its REPLY packet. MESSAGE packets that
        arrive meanwhile are kept in self.messages; keepalive PINGs are
        answered. stream: the call creates a stream, whose data may come
        before the reply (libvirtd starts the stream first): such packets
        are kept in self.stream_packets."""
        serial = self.next_serial()
        self.send_packet(prog, vers, proc, TYPE_CALL, serial, STATUS_OK,
                         payload)
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else self.timeout)
        while True:
            pkt = self.recv_packet(timeout=max(0.0, deadline
                                               - time.monotonic()))
            if pkt.type == TYPE_MESSAGE:
                if (pkt.prog == KEEPALIVE_PROGRAM
                        and pkt.proc == PROC_KEEPALIVE_PING):
                    self.send_packet(KEEPALIVE_PROGRAM, KEEPALIVE_VERSION,
                                     PROC_KEEPALIVE_PONG, TYPE_MESSAGE, 0)
                self.messages.append(pkt)
                continue
            if pkt.type == TYPE_REPLY and pkt.serial == serial:
                return pkt
            if stream and pkt.type == TYPE_STREAM and pkt.serial == serial:
                self.stream_packets.append(pkt)
                continue
            raise HarnessError("unexpected packet while waiting for serial "
                               "%d: %r" % (serial, pkt))

    @staticmethod
    def check_ok(pkt):
        if pkt.status != STATUS_OK:
            raise HarnessError("call failed: %r" % (decode_error(pkt.payload),))
        return pkt

    def auth_list(self):
        pkt = self.check_ok(self.call(PROC_AUTH_LIST))
        r = XdrReader(pkt.payload)
        return [r.i32() for _ in range(r.u32())]

    def connect_open(self, name="test:///default", flags=0):
        return self.call(PROC_CONNECT_OPEN,
                         xdr_opt_string(name) + xdr_u32(flags))

    def handshake(self, name="test:///default", readonly=False):
        self.auth_list()
        self.check_ok(self.connect_open(name, 1 if readonly else 0))

    def list_all_domains(self, flags=0):
        pkt = self.check_ok(self.call(PROC_CONNECT_LIST_ALL_DOMAINS,
                                      xdr_i32(1) + xdr_u32(flags)))
        r = XdrReader(pkt.payload)
        doms = [r.domain() for _ in range(r.u32())]
        r.u32()  # ret
        return doms

    def lookup_domain(self, name):
        pkt = self.check_ok(self.call(PROC_DOMAIN_LOOKUP_BY_NAME,
                                      xdr_string(name)))
        return XdrReader(pkt.payload).domain()

    def domain_info(self, dom):
        """DOMAIN_GET_INFO -> (state, maxMem, memory, nrVirtCpu, cpuTime)."""
        pkt = self.check_ok(self.call(PROC_DOMAIN_GET_INFO,
                                      xdr_domain(dom["name"], dom["uuid"],
                                                 dom["id"])))
        # unsigned char and unsigned short both take 4 bytes in XDR
        r = XdrReader(pkt.payload)
        return (r.u32(), r.u64(), r.u64(), r.u32(), r.u64())


# --------------------------------------------------------------------------
# admin endpoint
# --------------------------------------------------------------------------

def admin_get(address, path, timeout=5.0):
    """GET http://ADDRESS/PATH -> (HTTP status, body bytes)."""
    import http.client
    host, port = split_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def admin_status(address, timeout=5.0):
    """GET http://ADDRESS/status -> the decoded JSON document."""
    status, body = admin_get(address, "/status", timeout=timeout)
    if status != 200:
        raise HarnessError("GET /status: HTTP %d %r" % (status, body[:200]))
    return json.loads(body)


class Endpoints:
    """A test's setup in one place: the objects it made (keyword arguments
    become attributes) and its TCP listeners' ports and test:///default URIs,
    by listener name (``port``, ``uri``)."""

    def __init__(self, listeners, **objects):
        self.__dict__.update(objects)
        self.port = {lst["name"]: split_address(lst["address"])[1]
                     for lst in listeners if "address" in lst}
        self.uri = {n: "test+tcp://127.0.0.1:%d/default" % p
                    for n, p in self.port.items()}


def admin_request(address, method, path, timeout=5.0):
    """One HTTP request to the admin endpoint -> (status, decoded JSON body
    or None when the body is not JSON)."""
    import http.client
    host, port = split_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, None


def pool_event_counts(status):
    """(event_registrations, event_subscribers) summed over the pools of a
    /status document (a pool with nobody left may already be gone)."""
    regs = subs = 0
    for p in status.get("pools", []):
        regs += p["event_registrations"]
        subs += p["event_subscribers"]
    return regs, subs


# --------------------------------------------------------------------------
# events on the wire
# --------------------------------------------------------------------------

PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY = 316
PROC_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY = 317
PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE = 318
PROC_DOMAIN_EVENT_CALLBACK_REBOOT = 319
PROC_CONNECT_REGISTER_CLOSE_CALLBACK = 360
PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK = 361
PROC_CONNECT_EVENT_CONNECTION_CLOSED = 362

# virDomainEventID / virDomainEventType
DOMAIN_EVENT_ID_LIFECYCLE = 0
DOMAIN_EVENT_ID_REBOOT = 1
DOMAIN_EVENT_SUSPENDED = 3
DOMAIN_EVENT_RESUMED = 4


def xdr_event_register_args(event_id, dom=None):
    """remote_connect_domain_event_callback_register_any_args:
    int eventID; remote_domain dom (optional remote_nonnull_domain)."""
    if dom is None:
        return xdr_i32(event_id) + xdr_u32(0)
    return (xdr_i32(event_id) + xdr_u32(1)
            + xdr_domain(dom["name"], dom["uuid"], dom["id"]))


def raw_register_event(client, event_id=DOMAIN_EVENT_ID_LIFECYCLE, dom=None,
                       timeout=None):
    """Register a domain event callback on a RawClient; returns the
    callbackID the peer gave (HarnessError if refused)."""
    pkt = client.check_ok(client.call(
        PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
        xdr_event_register_args(event_id, dom), timeout=timeout))
    r = XdrReader(pkt.payload)
    cid = r.i32()
    if r.remaining():
        raise HarnessError("register reply has %d extra bytes" % r.remaining())
    return cid


def raw_deregister_event(client, callback_id, timeout=None):
    return client.call(PROC_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY,
                       xdr_i32(callback_id), timeout=timeout)


def decode_lifecycle(payload):
    """remote_domain_event_callback_lifecycle_msg:
    int callbackID; remote_domain_event_lifecycle_msg {dom, event, detail}
    -> (callbackID, domain name, event, detail)."""
    r = XdrReader(payload)
    cid = r.i32()
    name = r.domain()["name"]
    return cid, name, r.i32(), r.i32()



# --------------------------------------------------------------------------
# libvirt-python event subscribers in a child process
# --------------------------------------------------------------------------

# The child registers libvirt's default event loop (which would change how
# every later connection of the test process behaves, hence a child), opens
# N connections, and obeys one JSON command per stdin line with one JSON
# answer per stdout line. Event times are time.monotonic() (CLOCK_MONOTONIC,
# comparable between processes).
EVENT_CLIENT_SCRIPT = r'''
import json, random, sys, threading, time
import libvirt

libvirt.registerErrorHandler(lambda *a: None, None)
libvirt.virEventRegisterDefaultImpl()


def loop():
    while True:
        libvirt.virEventRunDefaultImpl()


threading.Thread(target=loop, daemon=True).start()
lock = threading.Lock()
conns, ids, events, closed = [], [], [], []
legacy_cbs = {}


def lifecycle_cb(i):
    def cb(conn, dom, event, detail, opaque):
        t = time.monotonic()
        with lock:
            events[i].append([t, dom.name(), event, detail])
    return cb


def close_cb(i):
    def cb(conn, reason, opaque):
        with lock:
            closed[i].append([time.monotonic(), reason])
    return cb


def err(e):
    if isinstance(e, libvirt.libvirtError):
        return [e.get_error_code(), str(e)]
    return [-1, repr(e)]


def do_open(uri, n, register, close_callback, legacy=False):
    out = {"ids": [], "errors": []}
    for _ in range(n):
        i = len(conns)
        events.append([])
        closed.append([])
        try:
            c = libvirt.open(uri)
        except libvirt.libvirtError as e:
            out["errors"].append(err(e))
            conns.append(None)
            ids.append(None)
            continue
        conns.append(c)
        ids.append(None)
        if close_callback:
            c.registerCloseCallback(close_cb(i), None)
        if register and legacy:
            # the pre-0.8 API: one lifecycle callback per connection
            try:
                legacy_cbs[i] = lifecycle_cb(i)
                c.domainEventRegister(legacy_cbs[i], None)
                ids[i] = "legacy"
            except libvirt.libvirtError as e:
                out["errors"].append(err(e))
        elif register:
            try:
                ids[i] = c.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    lifecycle_cb(i), None)
            except libvirt.libvirtError as e:
                out["errors"].append(err(e))
        out["ids"].append(ids[i])
    return out


def churn(uri, seconds, nthreads):
    """Threads that open, register, maybe deregister, close, again."""
    stats = {"cycles": 0, "errors": [], "events": 0}
    end = time.monotonic() + seconds

    def worker(k):
        rnd = random.Random(k)
        while time.monotonic() < end:
            got = []
            try:
                c = libvirt.open(uri)
                cid = c.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    lambda *a: got.append(1), None)
                time.sleep(rnd.uniform(0.0, 0.15))
                # (a close() without deregistering would keep the socket
                # open while libvirt holds the callback: subscribers that
                # vanish are raw sockets in the tests)
                c.domainEventDeregisterAny(cid)
                c.close()
            except Exception as e:
                with lock:
                    if len(stats["errors"]) < 10:
                        stats["errors"].append(err(e))
            with lock:
                stats["cycles"] += 1
                stats["events"] += len(got)

    ts = [threading.Thread(target=worker, args=(k,), daemon=True)
          for k in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    stats["stuck"] = sum(1 for t in ts if t.is_alive())
    return stats


def handle(cmd):
    op = cmd["op"]
    if op == "open":
        return do_open(cmd["uri"], cmd.get("n", 1), cmd.get("register", True),
                       cmd.get("close_callback", False),
                       cmd.get("legacy", False))
    if op == "events":
        with lock:
            return {"events": [list(e) for e in events],
                    "closed": [list(c) for c in closed]}
    if op == "count":
        with lock:
            return {"counts": [len(e) for e in events],
                    "closed": [len(c) for c in closed]}
    if op == "deregister":
        res = []
        for i, c in enumerate(conns):
            if c is None or ids[i] is None:
                res.append(None)
                continue
            try:
                if ids[i] == "legacy":
                    c.domainEventDeregister(legacy_cbs.pop(i))
                else:
                    c.domainEventDeregisterAny(ids[i])
                ids[i] = None
                res.append("ok")
            except libvirt.libvirtError as e:
                res.append(err(e))
        return {"deregister": res}
    if op == "call":
        # a quick call on each connection: getVersion()
        res = []
        for c in conns:
            t0 = time.monotonic()
            try:
                c.lookupByName("test").info()
                res.append(["ok", time.monotonic() - t0])
            except libvirt.libvirtError as e:
                res.append(["error", time.monotonic() - t0] + err(e))
        return {"call": res}
    if op == "alive":
        return {"alive": [c.isAlive() if c else None for c in conns]}
    if op == "close":
        res = []
        for c in conns:
            try:
                if c is not None:
                    c.close()
                res.append("ok")
            except libvirt.libvirtError as e:
                res.append(err(e))
        del conns[:]
        return {"close": res}
    if op == "churn":
        return churn(cmd["uri"], cmd["seconds"], cmd["threads"])
    raise ValueError("unknown op %r" % op)


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if not line.strip():
        continue
    cmd = json.loads(line)
    if cmd["op"] == "exit":
        break
    try:
        ans = handle(cmd)
    except Exception as e:
        ans = {"exception": repr(e)}
    print(json.dumps(ans), flush=True)
'''


class EventClients:
    """A child process holding libvirt-python connections with the default
    event loop (EVENT_CLIENT_SCRIPT); every request is bounded."""

    def __init__(self, python=None):
        import sys
        self.proc = subprocess.Popen(
            [python or sys.executable, "-c", EVENT_CLIENT_SCRIPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        first = self._readline(20.0)
        if not first.get("ready"):
            raise HarnessError("event client did not start: %r" % first)

    def _readline(self, timeout):
        t, res = start_call(self.proc.stdout.readline)
        t.join(timeout)
        if t.is_alive():
            raise HarnessError("event client: no answer within %.0f s"
                               % timeout)
        if res.error is not None:
            raise res.error
        if not res.value:
            err = ""
            try:
                self.proc.wait(2)
                err = self.proc.stderr.read()
            except Exception:
                pass
            raise HarnessError("event client exited (%s): %s"
                               % (self.proc.returncode, err[-2000:]))
        return json.loads(res.value)

    def request(self, timeout=30.0, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ans = self._readline(timeout)
        if "exception" in ans:
            raise HarnessError("event client: %s failed: %s"
                               % (cmd.get("op"), ans["exception"]))
        return ans

    def open(self, uri, n=1, register=True, close_callback=False,
             legacy=False, timeout=60.0):
        """Open n connections; register: a lifecycle callback on each
        (legacy: with virConnectDomainEventRegister); close_callback: a
        close callback on each. Returns {"ids": [...], "errors": [...]}."""
        return self.request(op="open", uri=uri, n=n, register=register,
                            close_callback=close_callback, legacy=legacy,
                            timeout=timeout)

    def events(self):
        return self.request(op="events")

    def counts(self):
        return self.request(op="count")["counts"]

    def wait_counts(self, expected, timeout=10.0):
        """Wait until every connection saw at least `expected` events
        (bounded); returns the last counts."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if all(c >= expected for c in counts) \
                    or time.monotonic() >= deadline:
                return counts
            time.sleep(0.05)

    def close(self, timeout=5.0):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            if not _wait_exit(self.proc, timeout):
                _signal_group(self.proc, signal.SIGKILL)
                _wait_exit(self.proc, 5.0)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def kill(self):
        _signal_group(self.proc, signal.SIGKILL)
        _wait_exit(self.proc, 5.0)


class RawSubscriber:
    """A raw-protocol event subscriber: a RawClient whose socket is read by
    a thread once start() is called. MESSAGE packets are kept in
    ``events`` as (time.monotonic(), Packet); calls made while the thread
    runs (``call``) get their replies through it. Keepalive PINGs are
    answered."""

    def __init__(self, port=None, unix=None, name="test:///default",
                 timeout=5.0):
        self.client = RawClient(port=port, unix=unix, timeout=timeout)
        self.client.handshake(name)
        self.timeout = timeout
        self.events = []
        self.closed_at = None       # monotonic time the peer closed
        self._replies = {}
        self._cond = threading.Condition()
        self._thread = None
        self._stop = False

    def register(self, event_id=DOMAIN_EVENT_ID_LIFECYCLE, dom=None,
                 proc=PROC_DOMAIN_EVENT_CALLBACK_REGISTER_ANY):
        pkt = RawClient.check_ok(self.call(
            proc, xdr_event_register_args(event_id, dom)))
        return XdrReader(pkt.payload).i32()

    def deregister(self, callback_id,
                   proc=PROC_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY):
        return self.call(proc, xdr_i32(callback_id))

    def call(self, proc, payload=b"", timeout=None):
        if self._thread is None:
            pkt = self.client.call(proc, payload, timeout=timeout)
            self.events.extend((time.monotonic(), m)
                               for m in self.client.messages
                               if m.prog != KEEPALIVE_PROGRAM)
            del self.client.messages[:]
            return pkt
        serial = self.client.next_serial()
        self.client.send_packet(REMOTE_PROGRAM, REMOTE_VERSION, proc,
                                TYPE_CALL, serial, STATUS_OK, payload)
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while serial not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed_at is not None:
                    raise HarnessError("no reply to proc %d (serial %d)"
                                       % (proc, serial))
                self._cond.wait(remaining)
            return self._replies.pop(serial)

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        c = self.client
        while not self._stop:
            try:
                pkt = c.recv_packet(timeout=0.2)
            except socket.timeout:
                continue
            except (ConnectionClosed, OSError, ValueError):
                with self._cond:
                    self.closed_at = time.monotonic()
                    self._cond.notify_all()
                return
            now = time.monotonic()
            if pkt.prog == KEEPALIVE_PROGRAM:
                if pkt.proc == PROC_KEEPALIVE_PING:
                    try:
                        c.send_packet(KEEPALIVE_PROGRAM, KEEPALIVE_VERSION,
                                      PROC_KEEPALIVE_PONG, TYPE_MESSAGE, 0)
                    except OSError:
                        pass
                continue
            with self._cond:
                if pkt.type == TYPE_REPLY:
                    self._replies[pkt.serial] = pkt
                else:
                    self.events.append((now, pkt))
                self._cond.notify_all()

    def lifecycle(self):
        """[(callbackID, domain, event, detail)] of the lifecycle events."""
        with self._cond:
            pkts = [p for _, p in self.events]
        return [decode_lifecycle(p.payload) for p in pkts
                if p.proc == PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE]

    def wait_events(self, n, timeout=10.0, proc=None):
        """Wait until at least n events (of proc, if given) arrived."""
        def count():
            with self._cond:
                return sum(1 for _, p in self.events
                           if proc is None or p.proc == proc)
        return wait_until(lambda: count() >= n, timeout) and count()

    def close(self):
        self._stop = True
        self.client.close()
        if self._thread is not None:
            self._thread.join(2.0)


# --------------------------------------------------------------------------
# socket statistics
# --------------------------------------------------------------------------

def tcp_bytes_received(pid, peer_port):
    """Sum of bytes_received over the established TCP sockets of process
    pid whose peer port is peer_port (from `ss -tinp`)."""
    r = subprocess.run(["ss", "-Htinp", "state", "established",
                        "( dport = :%d )" % peer_port],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise HarnessError("ss failed: %s" % r.stderr.strip())
    total = 0
    mine = False
    for line in r.stdout.splitlines():
        if not line.startswith((" ", "\t")):
            mine = ("pid=%d," % pid) in line
            continue
        if mine:
            for field in line.split():
                if field.startswith("bytes_received:"):
                    total += int(field.split(":", 1)[1])
    return total
