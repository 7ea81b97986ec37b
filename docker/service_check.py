#!/usr/bin/python3
"""virtmux.service as installed, run by systemd, checked with real clients.
Run by docker/test-sidecar.sh after it built IMAGE from
docker/Dockerfile.service-test (systemd as PID 1 in a container, the unit and
binary from `meson install`):

    DOCKER_HOST=unix:///PATH/docker.sock /usr/bin/python3 docker/service_check.py IMAGE

A private libvirtd (test driver) listens on loopback; the container shares the
host's network, so the service's TCP listener and its upstream are both on
127.0.0.1. Checks: the unit starts (after its --check-config step) as the
sysusers user with no capabilities, no new privileges, a seccomp filter and a
read-only root; /run/virtmux is made for it; virsh through the service
equals direct; `systemctl reload` delivers SIGHUP to the same process;
`systemctl stop` ends it cleanly; systemd-analyze security rates the unit at
most 2.0. Prints "service: N passed, M failed".
"""

import json
import os
import re
import shutil
import sys
import tempfile
import time

from sidecar_check import Checks, docker, same_virsh

import harness  # noqa: E402  (sidecar_check put tests/e2e on sys.path)

MAX_EXPOSURE = 2.0


def in_container(container, *argv, check=True):
    return docker("exec", container, *argv, check=check)


def systemctl_show(container, prop):
    return in_container(container, "systemctl", "show", "-p", prop, "--value",
                        "virtmux.service").stdout.strip()


def wait_active(container, timeout=30.0):
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        r = in_container(container, "systemctl", "is-active", "virtmux.service", check=False)
        state = r.stdout.strip()
        if state == "active":
            return
        if state == "failed":
            break
        time.sleep(0.2)
    journal = in_container(container, "journalctl", "-u", "virtmux", "--no-pager",
                           check=False).stdout
    raise RuntimeError("virtmux.service is %r, not active:\n%s" % (state, journal[-3000:]))


def started(container, port):
    wait_active(container)
    pre = systemctl_show(container, "ExecStartPre")
    if "--check-config" not in pre or not re.search(r"code=exited ; status=0\b", pre):
        raise AssertionError("ExecStartPre did not run --check-config successfully: %s" % pre)
    deadline = time.monotonic() + 10
    while not harness.tcp_accepts("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise AssertionError("active but not listening on %d" % port)
        time.sleep(0.1)


def sandboxed(container):
    pid = systemctl_show(container, "MainPID")
    status = in_container(container, "cat", "/proc/%s/status" % pid).stdout
    fields = dict(re.findall(r"^(\w+):\s+(\S+)", status, re.M))
    uid = in_container(container, "id", "-u", "virtmux").stdout.strip()
    problems = []
    if fields.get("Uid") != uid:
        problems.append("runs as uid %s, not virtmux (%s)" % (fields.get("Uid"), uid))
    if int(fields.get("CapEff", "1"), 16) or int(fields.get("CapBnd", "1"), 16):
        problems.append("capabilities: eff %s bnd %s" % (fields.get("CapEff"),
                                                         fields.get("CapBnd")))
    if fields.get("NoNewPrivs") != "1":
        problems.append("NoNewPrivs %s" % fields.get("NoNewPrivs"))
    if fields.get("Seccomp") != "2":
        problems.append("no seccomp filter (Seccomp %s)" % fields.get("Seccomp"))
    mounts = {}
    for line in in_container(container, "cat", "/proc/%s/mountinfo" % pid).stdout.splitlines():
        f = line.split()
        mounts[f[4]] = f[5].split(",")
    if "ro" not in mounts.get("/", []):
        problems.append("root not read-only: %s" % mounts.get("/"))
    if "rw" not in mounts.get("/run/virtmux", []):
        problems.append("/run/virtmux not writable: %s" % mounts.get("/run/virtmux"))
    if "/tmp" not in mounts:
        problems.append("no private /tmp")
    if problems:
        raise AssertionError("; ".join(problems))


def runtime_directory(container):
    out = in_container(container, "stat", "-c", "%U %a %F", "/run/virtmux",
                       "/run/virtmux/libvirt-sock").stdout.split("\n")
    if out[0] != "virtmux 755 directory" or out[1] != "virtmux 660 socket":
        raise AssertionError("unexpected: %r" % out[:2])


def reload_signals_same_process(container):
    pid = systemctl_show(container, "MainPID")
    in_container(container, "systemctl", "reload", "virtmux.service")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        journal = in_container(container, "journalctl", "-u", "virtmux", "--no-pager").stdout
        if "SIGHUP" in journal:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no SIGHUP in the journal after systemctl reload")
    wait_active(container, timeout=5)
    if systemctl_show(container, "MainPID") != pid:
        raise AssertionError("reload restarted the process")


def stops_cleanly(container, port):
    in_container(container, "systemctl", "stop", "virtmux.service")
    result = systemctl_show(container, "Result")
    status = systemctl_show(container, "ExecMainStatus")
    if result != "success" or status != "0":
        raise AssertionError("stop: Result=%s ExecMainStatus=%s" % (result, status))
    if harness.tcp_accepts("127.0.0.1", port):
        raise AssertionError("still listening after stop")


def exposure_ok(container):
    out = in_container(container, "systemd-analyze", "security", "--no-pager",
                       "virtmux.service").stdout
    m = re.search(r"Overall exposure level for virtmux.service: ([0-9.]+)", out)
    if not m:
        raise AssertionError("no exposure level in: %s" % out[-500:])
    print("    systemd-analyze security: %s" % m.group(0), flush=True)
    if float(m.group(1)) > MAX_EXPOSURE:
        raise AssertionError("exposure %s above %.1f" % (m.group(1), MAX_EXPOSURE))


def main(image):
    checks = Checks()
    tmp = tempfile.mkdtemp(prefix="virtmux-service-")
    os.chmod(tmp, 0o755)
    container = "virtmux-service-test-%d" % os.getpid()
    lv = None
    try:
        lv = harness.Libvirtd(name="service-libvirtd")
        lv.start()
        port = harness.free_port()
        etc = os.path.join(tmp, "etc")
        os.makedirs(etc, 0o755)
        cfg = {
            "listeners": [
                {"name": "tcp", "address": "127.0.0.1:%d" % port, "auth": "none"},
                {"name": "local", "unix": "/run/virtmux/libvirt-sock", "mode": "0660"},
            ],
            "upstreams": [{"name": "lv", "uri": lv.direct_uri}],
            "default_upstream": "lv",
        }
        with open(os.path.join(etc, "virtmux.json"), "w") as f:
            json.dump(cfg, f)
        os.chmod(os.path.join(etc, "virtmux.json"), 0o644)
        # systemd as PID 1: it needs its own /run, the cgroup tree, and
        # CAP_SYS_ADMIN to build each unit's sandbox (mount namespaces)
        docker("run", "-d", "--name", container, "--label", "virtmux-test=service",
               "--network", "host", "--cap-add", "SYS_ADMIN",
               "--security-opt", "seccomp=unconfined",
               "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
               "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro",
               "-v", "%s:/etc/virtmux:ro" % etc, image)
        checks.run("virtmux.service active after its --check-config step", started,
                   container, port)
        checks.run("sandbox: virtmux user, no capabilities, no new privileges, seccomp, "
                   "read-only root", sandboxed, container)
        checks.run("RuntimeDirectory /run/virtmux holds the unix listener", runtime_directory,
                   container)
        for args in (["list", "--all"], ["dominfo", "test"]):
            checks.run("virsh %s through the service equals direct" % " ".join(args),
                       same_virsh, "test+tcp://127.0.0.1:%d/default" % port, lv.direct_uri,
                       *args)
        checks.run("systemd-analyze security: exposure at most %.1f" % MAX_EXPOSURE,
                   exposure_ok, container)
        checks.run("systemctl reload sends SIGHUP to the same process",
                   reload_signals_same_process, container)
        checks.run("systemctl stop ends it cleanly", stops_cleanly, container, port)
    except Exception as e:
        checks.failed += 1
        print("FAIL - setup: %s" % e, flush=True)
    finally:
        if checks.failed:
            r = in_container(container, "journalctl", "-u", "virtmux", "--no-pager",
                             check=False)
            if r.returncode == 0:
                print("--- journal ---\n" + r.stdout[-3000:], flush=True)
        docker("rm", "-f", container, check=False)
        if lv is not None:
            lv.stop()
            lv.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print("service: %d passed, %d failed" % (checks.passed, checks.failed), flush=True)
    return 1 if checks.failed or not checks.passed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: service_check.py IMAGE", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
