"""`meson install` lays out a service: the binary (which answers --version and
--help), man pages that render without warnings and document every option,
signal and config key with its default, the example configs, and a systemd
unit that `systemd-analyze verify` accepts, hardened, with the sysusers.d
entry for its user."""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import harness

REPO = harness.REPO_ROOT
PREFIX_KEYS = ("prefix", "sbindir", "mandir", "datadir")

# Keys documented though config.c's key tables do not spell them (none now).
PENDING_KEYS = set()


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def dest():
    build = harness.build_dir()
    info = json.loads(run(["meson", "introspect", "--buildoptions", str(build)]).stdout)
    opts = {o["name"]: o["value"] for o in info}
    d = tempfile.mkdtemp(prefix="virtmux-install-")
    r = run(["meson", "install", "-C", str(build), "--destdir", d, "--no-rebuild"])
    assert r.returncode == 0, r.stdout + r.stderr
    prefix = Path(opts["prefix"])

    def under(option):
        p = Path(opts[option])
        return Path(d + str(p if p.is_absolute() else prefix / p))

    layout = {
        "root": Path(d),
        "sbin": under("sbindir"),
        "man": under("mandir"),
        "examples": under("datadir") / "doc" / "virtmux" / "examples",
        "unit": Path(d + str(prefix / "lib" / "systemd" / "system" / "virtmux.service")),
        "sysusers": Path(d + str(prefix / "lib" / "sysusers.d" / "virtmux.conf")),
        "prefix": prefix,
        "sbindir": prefix / opts["sbindir"],
    }
    yield layout
    shutil.rmtree(d, ignore_errors=True)


def project_version():
    text = (REPO / "meson.build").read_text()
    return re.search(r"version\s*:\s*'([^']+)'", text).group(1)


def long_options():
    """The long options main() accepts, from its getopt table."""
    src = (REPO / "proxy" / "main.c").read_text()
    table = src[src.index("struct option opts[]"):]
    table = table[:table.index("};")]
    names = re.findall(r'\{"([a-z-]+)",', table)
    assert len(names) >= 6
    return names


def man_text(path):
    """The page rendered as plain text (groff -Tutf8, overstrikes removed)."""
    r = run(["groff", "-man", "-Tutf8", "-ww", str(path)], env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert r.returncode == 0, r.stderr
    return re.sub(r".\x08", "", r.stdout)


# --------------------------------------------------------------------------


def test_layout(dest):
    assert os.access(dest["sbin"] / "virtmux", os.X_OK)
    assert (dest["man"] / "man8" / "virtmux.8").is_file()
    assert (dest["man"] / "man5" / "virtmux.json.5").is_file()
    assert dest["unit"].is_file()
    assert dest["sysusers"].is_file()
    shipped = sorted(p.name for p in dest["examples"].iterdir())
    assert shipped == sorted(p.name for p in (REPO / "config").glob("*.json"))
    for name in shipped:
        assert (dest["examples"] / name).read_bytes() == (REPO / "config" / name).read_bytes()


def test_version(dest):
    for flag in ("--version", "-V"):
        r = run([str(dest["sbin"] / "virtmux"), flag])
        assert r.returncode == 0, r.stderr
        assert r.stdout == "virtmux %s\n" % project_version()
        assert r.stderr == ""


def test_help_documents_every_option_and_signal(dest):
    r = run([str(dest["sbin"] / "virtmux"), "--help"])
    assert r.returncode == 0 and r.stderr == ""
    for name in long_options():
        assert re.search(r"--%s\b" % re.escape(name), r.stdout), name
    for sig in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"):
        assert sig in r.stdout
    bad = run([str(dest["sbin"] / "virtmux"), "--no-such-option"])
    assert bad.returncode == 2 and "usage:" in bad.stderr


@pytest.mark.parametrize("page", ["man8/virtmux.8", "man5/virtmux.json.5"])
def test_man_page_renders_without_warnings(dest, page):
    path = dest["man"] / page
    r = run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run(["man", "--warnings", "-l", str(path)],
            env=dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80", MAN_KEEP_STDERR="1"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "NAME" in r.stdout and "SEE ALSO" in r.stdout
    title = re.search(r'^\.TH .*"virtmux ([^"]+)"', path.read_text(), re.M)
    assert title and title.group(1) == project_version()


def test_man8_documents_options_and_signals(dest):
    text = man_text(dest["man"] / "man8" / "virtmux.8")
    for name in long_options():
        assert "--" + name in text, name
    for sig in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"):
        assert sig in text


def c_int(expr):
    """An integer constant as config.c writes them: 10000, -1, 0x7fffffff, 8 << 20."""
    expr = " ".join(expr.split())
    m = re.fullmatch(r"(-?(?:0x[0-9a-fA-F]+|\d+))(?: << (\d+))?", expr)
    assert m, "cannot read the C constant %r" % expr
    return int(m.group(1), 0) << int(m.group(2) or 0)


def config_keys():
    """Every key config.c accepts (its *_keys[] tables), and the integer
    defaults it applies: {key: (default, lo, hi)}."""
    src = (REPO / "src" / "config.c").read_text()
    keys = set()
    for table in re.findall(r"_keys\[\]\s*=\s*\{(.*?)\};", src, re.S):
        keys.update(re.findall(r'"([a-z_]+)"', table))
    ints = {}
    for key, default, lo, hi in re.findall(
            r'get_int\(ctx,\s*[^,]+,\s*[^,]+,\s*"([a-z_]+)",\s*([^,]+),\s*([^,]+),\s*([^)]+)\)',
            src):
        ints[key] = tuple(c_int(v) for v in (default, lo, hi))
    return keys, ints


def test_man5_documents_every_key_with_its_default(dest):
    text = man_text(dest["man"] / "man5" / "virtmux.json.5")
    keys, ints = config_keys()
    assert len(keys) > 40
    for key in sorted(keys | PENDING_KEYS):
        assert re.search(r"\b%s\b" % re.escape(key), text), "key %s not documented" % key
    # each integer key's entry line carries its default in brackets (and its
    # range where it is a plain interval)
    entries = {}
    for line in text.splitlines():
        m = re.match(r"\s+(?:[a-z_]+(?:\[\])?\.)*([a-z_]+) \((integer[^)]*)\) \[([^]]*)\]", line)
        if m:
            entries[m.group(1)] = (m.group(2), m.group(3))
    for key, (default, lo, hi) in ints.items():
        if key in ("unix_uid", "unix_gid"):
            continue        # -1 stands for "any": documented as a match, not a number
        assert key in entries, "no entry line for %s" % key
        kind, shown = entries[key]
        assert re.match(r"%d\b" % default, shown), (key, shown, default)
        assert "%d..%d" % (lo if lo >= 0 else 1, hi) in kind, (key, kind, lo, hi)


def test_unit_verifies_and_is_hardened(dest):
    unit = dest["unit"].read_text()
    exe = str(dest["sbindir"] / "virtmux")
    directives = dict(re.findall(r"^([A-Za-z]+)=(.*)$", unit, re.M))
    assert directives["ExecStart"].split()[:2] == [exe, "--config"]
    assert directives["ExecReload"] == "kill -HUP $MAINPID"
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "RuntimeDirectory": "virtmux", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                       "User": "virtmux"}.items():
        assert directives.get(key) == value, key
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found (Debian package systemd, scripts/deps.sh)"
    # verify the unit as installed, pointing its commands at the DESTDIR copy
    d = tempfile.mkdtemp(prefix="virtmux-unit-")
    try:
        copy = os.path.join(d, "virtmux.service")
        with open(copy, "w") as f:
            f.write(unit.replace(exe, str(dest["sbin"] / "virtmux")))
        r = run([analyze, "verify", copy],
                env=dict(os.environ, MANPATH=str(dest["man"]), SYSTEMD_LOG_LEVEL="notice"))
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
        # and verify does fail on a broken unit (so the pass above means something)
        with open(copy, "a") as f:
            f.write("[Service]\nExecStart=relative/path\n")
        r = run([analyze, "verify", copy], env=dict(os.environ, MANPATH=str(dest["man"])))
        assert r.returncode != 0 or r.stderr.strip() != ""
    finally:
        shutil.rmtree(d, ignore_errors=True)
    sysusers = shutil.which("systemd-sysusers")
    if sysusers:
        r = run([sysusers, "--dry-run", str(dest["sysusers"])])
        assert r.returncode == 0, r.stderr
