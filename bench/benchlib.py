"""Pieces shared by the benchmark scripts in bench/ (bench_getinfo.py,
bench_events.py, bench_connect.py).

Importing this module puts tests/e2e on sys.path, so that a script can
then import harness (and pki) from there; `from benchlib import harness`
names the same module.

What is here:
  * /proc sampling: CPU seconds of processes and threads, the machine's
    busy time, a combined sample
  * statistics and formatting: nearest-rank percentile, ratio, fmt, the
    per-(N, target) median over the rounds
  * child processes: spreading N over processes, starting and stopping
    them, receiving their pipe messages
  * the report: machine facts, load average, the common lines of the
    Markdown text, log line counting, the section writer for
    docs/BENCHMARKS.md
  * main-program plumbing: prerequisites, a private copy of the gateway
    binary, the shutdown of libvirtd and virtmux (logs kept), the exit
    code, the top-level error handler

Nothing here starts libvirtd or virtmux: that is tests/e2e/harness.py
(the scripts run virtmux as harness.Virtmux(..., verbose=False), so that
the configured log level applies).
"""

import contextlib
import datetime
import hashlib
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
E2E_DIR = REPO / "tests" / "e2e"
if str(E2E_DIR) not in sys.path:
    sys.path.insert(0, str(E2E_DIR))

import harness  # noqa: E402

TARGETS = ("direct", "virtmux")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK = 1.0 / CLK_TCK                    # resolution of /proc CPU times


class BenchError(RuntimeError):
    """The benchmark cannot go on; reported as one line, not a traceback."""


# --------------------------------------------------------------------------
# /proc sampling
# --------------------------------------------------------------------------

def _stat_cpu(path):
    """utime+stime in seconds from a /proc/PID/stat (or .../task/TID/stat)
    file, or None if it cannot be read (the process is gone)."""
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold blanks and ")": skip past the
    # last ")"; fields[0] is then field 3 (state), utime and stime are
    # fields 14 and 15
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu(pid, missing=0.0):
    """utime+stime of a process (all its threads) in seconds; `missing`
    if the process is gone."""
    cpu = _stat_cpu("/proc/%d/stat" % pid)
    return missing if cpu is None else cpu


def task_cpus(pid):
    """{tid: utime+stime in seconds} for every thread of pid."""
    out = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        cpu = _stat_cpu("/proc/%d/task/%s/stat" % (pid, tid))
        if cpu is not None:
            out[int(tid)] = cpu
    return out


def cpu_ticks():
    """The machine-wide "cpu" line of /proc/stat in clock ticks: user nice
    system idle iowait irq softirq steal [guest guest_nice]."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def machine_busy(with_irq=False):
    """Busy CPU seconds of the whole machine (all CPUs) from /proc/stat:
    user + nice + system + irq + softirq. Steal is time the hypervisor gave
    to someone else, so it does not count as busy here. With with_irq:
    (busy, irq + softirq)."""
    vals = cpu_ticks()
    busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / CLK_TCK
    if with_irq:
        return busy, (vals[5] + vals[6]) / CLK_TCK
    return busy


def cpu_sample(pids, thread_pids=()):
    """One sample: perf_counter time "t", machine "busy" and "irq" seconds,
    "cpu" {name: CPU seconds summed over the pids in pids[name]} and
    "tasks" {name: task_cpus(first pid)} for the names in thread_pids."""
    busy, irq = machine_busy(with_irq=True)
    return {
        "t": time.perf_counter(),
        "busy": busy,
        "irq": irq,
        "cpu": {name: sum(proc_cpu(p) for p in plist)
                for name, plist in pids.items()},
        "tasks": {name: task_cpus(pids[name][0]) for name in thread_pids},
    }


# --------------------------------------------------------------------------
# statistics and formatting
# --------------------------------------------------------------------------

def percentile(sorted_vals, q):
    """Nearest-rank percentile of an already sorted list (nan if empty)."""
    if not sorted_vals:
        return float("nan")
    k = math.ceil(q / 100.0 * len(sorted_vals)) - 1
    return sorted_vals[max(0, min(len(sorted_vals) - 1, k))]


def ratio(a, b):
    """a / b, or nan if b is 0 or either is nan."""
    if not b or a != a or b != b:
        return float("nan")
    return a / b


def fmt(v, nd=2):
    """v with nd decimals; "n/a" for None and nan, never "-0.00"."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if abs(v) < 0.5 * 10 ** -nd:
        v = 0.0
    return "%.*f" % (nd, v)


def summarize_rounds(results, median_keys, sum_keys, first_keys=(),
                     max_keys=()):
    """Group per-run result dicts by (r["n"], r["target"]) and return
    {(n, target): cell}. A cell holds n, target, the number of rounds, the
    median of every median_keys value, the sum of every sum_keys value, the
    first run's first_keys values and, for max_keys, the largest value that
    is not None (None if there is none)."""
    by = {}
    for r in results:
        by.setdefault((r["n"], r["target"]), []).append(r)
    summary = {}
    for key, rs in by.items():
        s = {"n": key[0], "target": key[1], "rounds": len(rs)}
        for k in first_keys:
            s[k] = rs[0][k]
        for k in median_keys:
            s[k] = statistics.median(r[k] for r in rs)
        for k in sum_keys:
            s[k] = sum(r[k] for r in rs)
        for k in max_keys:
            vals = [r[k] for r in rs if r[k] is not None]
            s[k] = max(vals) if vals else None
        summary[key] = s
    return summary


# --------------------------------------------------------------------------
# child processes (multiprocessing, spawn, one pipe each)
# --------------------------------------------------------------------------

def split_evenly(total, parts):
    """total spread over parts as evenly as possible, larger shares first."""
    return [total // parts + (1 if i < total % parts else 0)
            for i in range(parts)]


def start_workers(workers, target, args_list):
    """Start one spawned daemon process per tuple in args_list, running
    target(*args, child_end_of_a_pipe). (process, parent_end) pairs are
    appended to workers as they start, so that a caller's finally block
    (stop_workers) also reaps the ones started before a failure."""
    ctx = multiprocessing.get_context("spawn")
    for args in args_list:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=target, args=tuple(args) + (child_end,),
                        daemon=True)
        p.start()
        child_end.close()
        workers.append((p, parent_end))


def stop_workers(workers, farewell=None):
    """Send farewell (if any) to every worker, give each 5 s to exit, kill
    the ones that do not, and close the pipes."""
    for p, pipe in workers:
        if farewell is not None:
            try:
                pipe.send(farewell)
            except OSError:
                pass
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
        pipe.close()


def recv_message(pipe, deadline, what, who="client process"):
    """The next message from a worker's pipe, which must be a tuple whose
    first item is `what`, by time.monotonic() deadline. A worker reports a
    failure as ("error", text)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not pipe.poll(remaining):
        raise BenchError("%s: no %r message in time" % (who, what))
    try:
        msg = pipe.recv()
    except EOFError:
        raise BenchError("%s died before sending %r" % (who, what))
    if msg[0] == "error":
        raise BenchError(msg[1])
    if msg[0] != what:
        raise BenchError("%s sent %r, expected %r" % (who, msg[0], what))
    return msg


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def _run_text(argv, timeout=10):
    """stdout of a command, stripped; None if it cannot be run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_facts(binary, dirty_paths=("src", "proxy")):
    """What describes the machine and the software of a run:

    nproc           CPUs this process may use (`nproc`)
    cpu_count       CPUs online (os.cpu_count())
    cpu             CPU model from /proc/cpuinfo
    kernel, python  platform release and Python version
    libvirtd        `libvirtd --version`
    libvirt_python  version of the libvirt the python module talks to
    commit, dirty   checkout HEAD, and whether git status shows changes in
                    dirty_paths
    binary, binary_sha, binary_mtime
                    the gateway binary that runs, its sha256 (12 digits)
                    and modification time (UTC)
    """
    facts = {"cpu_count": os.cpu_count()}
    try:
        facts["nproc"] = int(_run_text(["nproc"], timeout=5))
    except (TypeError, ValueError):
        facts["nproc"] = os.cpu_count()
    facts["libvirtd"] = (_run_text([harness.LIBVIRTD, "--version"])
                         or "unknown")
    try:
        import libvirt
        v = libvirt.getVersion()
        facts["libvirt_python"] = "%d.%d.%d" % (v // 1000000,
                                                (v // 1000) % 1000, v % 1000)
    except Exception:
        facts["libvirt_python"] = "unknown"
    facts["cpu"] = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    facts["kernel"] = platform.release()
    facts["python"] = platform.python_version()
    git = ["git", "-C", str(REPO)]
    facts["commit"] = (_run_text(git + ["rev-parse", "--short", "HEAD"])
                       or "unknown")
    dirty = _run_text(git + ["status", "--porcelain", "--"]
                      + list(dirty_paths))
    facts["dirty"] = None if dirty is None else bool(dirty)
    facts["binary"] = str(binary)
    try:
        with open(binary, "rb") as f:
            facts["binary_sha"] = hashlib.sha256(f.read()).hexdigest()[:12]
        facts["binary_mtime"] = datetime.datetime.fromtimestamp(
            os.stat(binary).st_mtime, datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S")
    except OSError:
        facts["binary_sha"] = facts["binary_mtime"] = "unknown"
    return facts


def loadavg():
    """The 1, 5 and 15 minute load averages, as one string."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def command_lines(command, when, wall):
    """The opening lines of a report: the command and the date."""
    return ["Command (from the repository root):",
            "",
            "    " + command,
            "",
            "- Date: %s (UTC); wall time of the run %.0f s"
            % (when.strftime("%Y-%m-%d %H:%M"), wall)]


def print_setup(lvd, vmx, ncpu, load):
    """The "# libvirtd pid ..." line on stderr at the start of a run."""
    print("# libvirtd pid %d port %d, virtmux pid %d port %d; %d CPUs, "
          "load %s" % (lvd.proc.pid, lvd.port, vmx.proc.pid, vmx.port,
                       ncpu, load), file=sys.stderr)


def interpretation_head(aborted):
    """The lines that open a report's generated interpretation."""
    lines = ["", "Interpretation (generated from the numbers above):", ""]
    if aborted:
        lines.append("- **The run was aborted**: %s. The tables hold only "
                     "the runs completed before that." % aborted)
    return lines


def details_lines(title, table):
    """A Markdown table folded into <details> (the per-run tables)."""
    return ["", "<details><summary>%s</summary>" % title, "", table, "",
            "</details>"]


def count_repeats(lines, limit, key):
    """The first `limit` distinct key(line) values of lines, in order, each
    followed by "  [xN]" where it stood N > 1 times."""
    counts = {}
    for ln in lines:
        k = key(ln)
        counts[k] = counts.get(k, 0) + 1
    return [k + ("  [x%d]" % n if n > 1 else "")
            for k, n in list(counts.items())[:limit]]


def section_markers(name):
    """The begin and end markers of a script's section in BENCHMARKS.md."""
    return ("<!-- %s: begin (generated by bench/%s.py) -->" % (name, name),
            "<!-- %s: end -->" % name)


def write_section(path, name, body):
    """Replace the text between the markers of section `name` in the
    Markdown file at path (markers included) by body; append the section if
    the markers are not there. The file is replaced atomically."""
    begin, end = section_markers(name)
    path = Path(path)
    section = begin + "\n" + body.rstrip("\n") + "\n" + end
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    b, e = text.find(begin), text.find(end)
    if b != -1 and e != -1 and e > b:
        text = text[:b] + section + text[e + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(write, name, text, aborted):
    """After the report is printed: write it into the file `write` (if
    given) unless the run was aborted. Returns the exit status."""
    if aborted:
        if write:
            print("\n# run aborted: %s left unchanged" % write,
                  file=sys.stderr)
        return 1
    if write:
        write_section(write, name, text)
        print("\n# wrote %s" % write, file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# main-program plumbing
# --------------------------------------------------------------------------

def int_list(ap, text, option):
    """Comma-separated positive integers of an option (ap.error if not)."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error("%s takes comma-separated integers" % option)
    if not vals or min(vals) < 1:
        ap.error("%s needs positive integers" % option)
    return vals


def gateway_binary(option):
    """The gateway binary named by --virtmux, or the build's."""
    return Path(option) if option else harness.virtmux_binary()


def check_prerequisites(name, binary, more=()):
    """Exit with "name: problem; problem" if the benchmark cannot run here:
    the libvirt module, root, libvirtd, virt-admin and binary must be there;
    `more` are the script's own problems."""
    problems = []
    try:
        import libvirt  # noqa: F401
    except ImportError:
        problems.append("python module libvirt missing: run with "
                        "/usr/bin/python3")
    if os.geteuid() != 0:
        problems.append("must run as root (libvirtd is started privately)")
    for p in (harness.LIBVIRTD, harness.VIRT_ADMIN):
        if not os.access(p, os.X_OK):
            problems.append("%s missing" % p)
    if not os.access(str(binary), os.X_OK):
        problems.append("%s missing: meson setup build && ninja -C build"
                        % binary)
    problems.extend(more)
    if problems:
        raise SystemExit(name + ": " + "; ".join(problems))


@contextlib.contextmanager
def binary_snapshot(source, prefix):
    """A private copy of the gateway binary (in a temporary directory that
    is removed afterwards): the build directory may be rebuilt while the
    benchmark runs, and the reported hash must describe what ran."""
    snapdir = tempfile.mkdtemp(prefix=prefix)
    try:
        binary = Path(snapdir) / "virtmux"
        shutil.copy2(str(source), str(binary))
        yield binary
    finally:
        shutil.rmtree(snapdir, ignore_errors=True)


def shut_down(vmx, lvd, keep_logs=None):
    """Stop virtmux (None: never created) with SIGTERM, then libvirtd; copy
    both logs to the directory keep_logs if given; remove their temporary
    directories. Returns (virtmux exit status or None, virtmux log,
    libvirtd log), the logs as they were once each had stopped."""
    vmx_rc, vmx_log = None, ""
    if vmx is not None:
        vmx_rc = vmx.stop()
        vmx_log = vmx.log_text()
    lvd.stop()
    lvd_log = lvd.log_text()
    if keep_logs:
        os.makedirs(keep_logs, exist_ok=True)
        for src, name in ((vmx.log_path if vmx else None, "virtmux.log"),
                          (lvd.log_path, "libvirtd.log")):
            if src and os.path.exists(src):
                shutil.copy(src, os.path.join(keep_logs, name))
    if vmx is not None:
        vmx.cleanup()
    lvd.cleanup()
    return vmx_rc, vmx_log, lvd_log


def run_main(main, name):
    """sys.exit(main()), with BenchError and HarnessError reported as one
    line "name: message" and exit status 1."""
    try:
        sys.exit(main())
    except (BenchError, harness.HarnessError) as e:
        print("%s: %s" % (name, e), file=sys.stderr)
        sys.exit(1)
