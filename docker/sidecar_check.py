#!/usr/bin/python3
"""The virtmux container as a sidecar next to a real libvirtd, checked with
real clients. Run by docker/test-sidecar.sh (which starts the private Docker
engine, builds the image and exports DOCKER_HOST); by hand:

    DOCKER_HOST=unix:///PATH/docker.sock /usr/bin/python3 docker/sidecar_check.py IMAGE

What it sets up, the way a sidecar is deployed:

  host: private libvirtd (test driver)        container IMAGE, --network host,
        unix socket dir RUN/ (group SOCK_GID,  non-root (uid 10100), read-only rootfs,
        mode 0770)  ------------------------>  RUN/ mounted on /run/libvirt
        CONF/ virtmux.json + virtmux.sasldb ->  /etc/virtmux (read-only)
        VMRUN/  <----------------------------  /run/virtmux (its unix listener)
        virsh / libvirt-python  --TCP+SASL-->  127.0.0.1:PORT (DIGEST-MD5)

The config is config/sidecar-sasl.json with only the port and the driver
changed. Every answer through the container must equal the direct one.
Prints one line per check and "sidecar: N passed, M failed"; exits 1 if any
check failed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import libvirt  # noqa: E402

import harness  # noqa: E402
import pki  # noqa: E402

DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
UID = 10100                 # the image's virtmux user (docker/Dockerfile)
SOCK_GID = 10200            # stands for the host's "libvirt" group
USERS = {"ops": "sidecar-secret"}
DOMAIN_XML = ("<domain type='test'><name>%s</name><memory>65536</memory>"
              "<os><type>hvm</type></os></domain>")

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # a failed check is reported, the others still run
            self.failed += 1
            print("FAIL - %s: %s" % (name, e), flush=True)
            if os.environ.get("VIRTMUX_TEST_DEBUG"):
                traceback.print_exc()
        else:
            self.passed += 1
            print("ok - %s" % name, flush=True)


def docker(*args, check=True, timeout=120):
    r = subprocess.run([DOCKER] + list(args), capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError("docker %s: exit %d: %s" % (" ".join(args[:2]), r.returncode,
                                                       (r.stderr or r.stdout).strip()))
    return r


def normalise(text):
    # the test driver reports wall-clock time as CPU time
    return re.sub(r"(CPU time:\s+)\S+", r"\1<t>", text)


def same_virsh(via_uri, direct_uri, *args):
    via = harness.virsh(via_uri, *args)
    direct = harness.virsh(direct_uri, *args)
    if direct.returncode != 0:
        raise AssertionError("direct virsh %s failed: %s" % (args, direct.stderr))
    if via.returncode != 0:
        raise AssertionError("virsh %s through the sidecar failed: %s" % (args, via.stderr))
    if normalise(via.stdout) != normalise(direct.stdout):
        raise AssertionError("virsh %s differs:\n--- sidecar\n%s--- direct\n%s"
                             % (args, via.stdout, direct.stdout))


def domain_facts(conn):
    facts = {}
    for dom in conn.listAllDomains():
        state, maxmem, mem, ncpu, _cputime = dom.info()
        facts[dom.name()] = (dom.UUIDString(), state, maxmem, mem, ncpu, dom.isActive())
    return facts


def same_python(via_uri, direct_uri, user, password):
    via = libvirt.openAuth(via_uri, pki.auth_callback(user, password), 0)
    direct = libvirt.open(direct_uri)
    try:
        a, b = domain_facts(via), domain_facts(direct)
        if not a or a != b:
            raise AssertionError("domains differ: sidecar %r, direct %r" % (a, b))
        if via.getInfo() != direct.getInfo():
            raise AssertionError("node info differs")
        if via.getVersion() != direct.getVersion():
            raise AssertionError("driver version differs")
    finally:
        via.close()
        direct.close()


def wrong_password_refused(uri_base, authfile):
    r = harness.virsh(uri_base + "?authfile=" + authfile, "list", "--all")
    if r.returncode == 0:
        raise AssertionError("a wrong password was accepted")
    if "authentication failed" not in r.stderr.lower():
        raise AssertionError("unexpected error: %s" % r.stderr.strip())


def define_through(via_uri, direct_uri, tmp):
    keeper = libvirt.open(direct_uri)
    try:
        xml = os.path.join(tmp, "sidecar-dom.xml")
        with open(xml, "w") as f:
            f.write(DOMAIN_XML % "through-sidecar")
        r = harness.virsh(via_uri, "define", xml)
        if r.returncode != 0:
            raise AssertionError("define through the sidecar failed: %s" % r.stderr)
        names = [d.name() for d in keeper.listAllDomains()]
        if "through-sidecar" not in names:
            raise AssertionError("libvirtd does not have the domain: %s" % names)
        r = harness.virsh(via_uri, "undefine", "through-sidecar")
        if r.returncode != 0:
            raise AssertionError("undefine through the sidecar failed: %s" % r.stderr)
        if "through-sidecar" in [d.name() for d in keeper.listAllDomains()]:
            raise AssertionError("still defined after undefine")
    finally:
        keeper.close()


def runs_unprivileged(container):
    status = docker("exec", container, "cat", "/proc/1/status").stdout
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
    caps = re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M)
    if not uid or int(uid.group(1)) != UID or int(uid.group(2)) != UID:
        raise AssertionError("virtmux does not run as uid %d: %s" % (UID, uid and uid.group(0)))
    if not caps or int(caps.group(1), 16) != 0:
        raise AssertionError("virtmux has capabilities: %s" % (caps and caps.group(0)))
    user = docker("image", "inspect", "-f", "{{.Config.User}}", IMAGE).stdout.strip()
    if user != "virtmux:virtmux":
        raise AssertionError("image user is %r" % user)


def logs_are_json(container):
    out = docker("logs", container).stderr.strip().splitlines()
    if not out:
        raise AssertionError("no log output")
    for line in out:
        rec = json.loads(line)
        if "msg" not in rec and "message" not in rec:
            raise AssertionError("log line without a message: %s" % line)


def examples_valid(tmp):
    """Every example config shipped in the image passes --check-config inside
    the image, with the files it names mounted where it names them."""
    etc = os.path.join(tmp, "examples-etc")
    os.makedirs(os.path.join(etc, "pki"))
    ca = pki.Pki(os.path.join(tmp, "examples-ca"))
    srv, gw = ca.server("gw.example.net"), ca.client("virtmux-gw")
    for src, dst in [(srv.cert, "servercert.pem"), (srv.key, "serverkey.pem"),
                     (ca.ca_cert, "cacert.pem"), (gw.cert, "gw-cert.pem"),
                     (gw.key, "gw-key.pem"), (ca.ca_cert, "cacrl.pem")]:
        shutil.copy(src, os.path.join(etc, "pki", dst))
    for db in ("passwd.db", "virtmux.sasldb"):
        pki.make_sasldb(os.path.join(etc, db), USERS)
    pki.write_password_file(os.path.join(etc, "hv2.password"), "pw")
    for root, dirs, files in os.walk(etc):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chown(os.path.join(root, f), UID, UID)
    listing = docker("run", "--rm", "--entrypoint", "ls", IMAGE,
                     "/usr/share/doc/virtmux/examples").stdout.split()
    expected = sorted(p.name for p in (REPO / "config").glob("*.json"))
    if sorted(listing) != expected:
        raise AssertionError("examples in the image %s, in config/ %s" % (listing, expected))
    bad = []
    for name in listing:
        r = docker("run", "--rm", "--network", "none", "-v", "%s:/etc/virtmux:ro" % etc,
                   IMAGE, "--check-config", "/usr/share/doc/virtmux/examples/" + name,
                   check=False)
        if r.returncode != 0:
            bad.append("%s: %s" % (name, (r.stderr or r.stdout).strip()))
    if bad:
        raise AssertionError("; ".join(bad))


def libvirtd_knowing_sidecar_user(tmp):
    """A libvirtd command that sees the container's user in /etc/passwd.

    libvirtd looks up the user record of every unix-socket peer and refuses
    one it cannot find, so the sidecar's uid must exist where libvirtd runs
    (on a real host: `useradd --system --uid 10100 virtmux`). The test does
    not touch the host's /etc: libvirtd runs in a mount namespace of its own
    with copies of /etc/passwd and /etc/group that add the user and the
    socket group bind-mounted over the originals."""
    etc = os.path.join(tmp, "libvirtd-etc")
    os.makedirs(etc)
    with open("/etc/passwd") as src, open(os.path.join(etc, "passwd"), "w") as dst:
        dst.write(src.read())
        dst.write("virtmux:x:%d:%d:virtmux sidecar:/nonexistent:/usr/sbin/nologin\n" % (UID, UID))
    with open("/etc/group") as src, open(os.path.join(etc, "group"), "w") as dst:
        dst.write(src.read())
        dst.write("virtmux:x:%d:\nvirtmux-sock:x:%d:virtmux\n" % (UID, SOCK_GID))
    wrapper = os.path.join(tmp, "libvirtd-with-sidecar-user")
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\n"
                "exec %s --mount --propagation private -- /bin/sh -c '"
                "mount --bind %s/passwd /etc/passwd && "
                "mount --bind %s/group /etc/group && "
                "exec %s \"$@\"' libvirtd \"$@\"\n" % (unshare, etc, etc, harness.LIBVIRTD))
    os.chmod(wrapper, 0o755)
    return wrapper


def wait_ready(container, port, unix_path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        if state != "true":
            raise RuntimeError("the sidecar exited:\n%s" % docker("logs", container).stderr)
        if harness.tcp_accepts("127.0.0.1", port) and harness.unix_accepts(unix_path):
            return
        time.sleep(0.1)
    raise RuntimeError("the sidecar did not listen within %.0f s:\n%s"
                       % (timeout, docker("logs", container).stderr))


def main():
    checks = Checks()
    tmp = tempfile.mkdtemp(prefix="virtmux-sidecar-")
    os.chmod(tmp, 0o755)
    container = "virtmux-sidecar-test-%d" % os.getpid()
    lv = None
    try:
        harness.LIBVIRTD = libvirtd_knowing_sidecar_user(tmp)
        lv = harness.Libvirtd(name="sidecar-libvirtd", extra_conf={
            "unix_sock_group": "+%d" % SOCK_GID,
            "unix_sock_rw_perms": "0770",
            "unix_sock_ro_perms": "0770",
        })
        lv.start()
        os.chmod(lv.rundir, 0o755)

        conf = os.path.join(tmp, "conf")
        vmrun = os.path.join(tmp, "vmrun")
        os.makedirs(conf, 0o755)
        os.makedirs(vmrun, 0o755)
        os.chown(vmrun, UID, UID)
        sasldb = pki.make_sasldb(os.path.join(conf, "virtmux.sasldb"), USERS)
        os.chown(sasldb, UID, UID)
        port = harness.free_port()
        cfg = json.loads((REPO / "config" / "sidecar-sasl.json").read_text())
        cfg["listeners"][0]["address"] = "127.0.0.1:%d" % port
        cfg["upstreams"][0]["uri"] = "test+unix:///default?socket=/run/libvirt/libvirt-sock"
        with open(os.path.join(conf, "virtmux.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        os.chmod(os.path.join(conf, "virtmux.json"), 0o644)

        docker("run", "-d", "--name", container, "--label", "virtmux-test=sidecar",
               "--network", "host", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges",
               "--group-add", str(SOCK_GID),
               "-v", "%s:/run/libvirt" % lv.rundir,
               "-v", "%s:/etc/virtmux:ro" % conf,
               "-v", "%s:/run/virtmux" % vmrun,
               IMAGE)
        unix_sock = os.path.join(vmrun, "libvirt-sock")
        wait_ready(container, port, unix_sock)

        authfile = pki.write_authfile(os.path.join(tmp, "ops.auth"), "ops", USERS["ops"])
        badfile = pki.write_authfile(os.path.join(tmp, "bad.auth"), "ops", "wrong")
        tcp_base = "test+tcp://127.0.0.1:%d/default" % port
        tcp_uri = tcp_base + "?authfile=" + authfile
        unix_uri = "test+unix:///default?socket=" + unix_sock
        direct = lv.unix_uri

        checks.run("runs as uid %d with no capabilities" % UID, runs_unprivileged, container)
        for args in (["list", "--all"], ["dominfo", "test"], ["domstate", "test"],
                     ["net-list", "--all"], ["nodeinfo"]):
            checks.run("virsh %s via TCP+SASL equals direct" % " ".join(args),
                       same_virsh, tcp_uri, direct, *args)
        checks.run("virsh list --all via the container's unix listener equals direct",
                   same_virsh, unix_uri, direct, "list", "--all")
        checks.run("libvirt-python via TCP+SASL equals direct",
                   same_python, tcp_base, direct, "ops", USERS["ops"])
        checks.run("a wrong password is refused", wrong_password_refused, tcp_base, badfile)
        checks.run("define/undefine through the sidecar reach libvirtd",
                   define_through, tcp_uri, direct, tmp)
        checks.run("logs are JSON lines", logs_are_json, container)
        checks.run("every example config passes --check-config in the image",
                   examples_valid, tmp)
    except Exception as e:
        checks.failed += 1
        print("FAIL - setup: %s" % e, flush=True)
    finally:
        if checks.failed and container:
            r = docker("logs", container, check=False)
            if r.returncode == 0:
                print("--- sidecar log ---\n" + r.stderr[-4000:], flush=True)
        docker("rm", "-f", container, check=False)
        if lv is not None:
            lv.stop()
            lv.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print("sidecar: %d passed, %d failed" % (checks.passed, checks.failed), flush=True)
    return 1 if checks.failed or not checks.passed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: sidecar_check.py IMAGE", file=sys.stderr)
        sys.exit(2)
    IMAGE = sys.argv[1]
    sys.exit(main())
