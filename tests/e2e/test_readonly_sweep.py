"""Exhaustive read-only sweep: one raw packet per procedure from a read-only
session, checked three ways.

* the reply: every refused call gets REPLY/ERROR VIR_ERR_OPERATION_DENIED (29)
  with libvirt's wording and the error domain of the refusing API's family;
* the tap (tap.py) between the gateway and libvirtd: none of the refused
  packets reached libvirtd, and every allowed one did, byte for byte;
* libvirtd itself (direct connection) and the admin endpoint: state
  unchanged, ``denials_total`` grew by exactly the number of refusals.

The session is made read-only in each of the three ways the gateway knows:
the client's VIR_CONNECT_RO flag, a ``readonly`` listener, a ``readonly``
policy rule. The expected verdicts come from data/procedures.tsv and
data/readonly-flags.tsv, read here independently of the generated C table.
"""

import collections
import re
import struct
import time

import libvirt
import pytest

import harness
import tap as tapmod
from harness import (REMOTE_PROGRAM, STATUS_ERROR, RawClient, decode_error,
                     xdr_domain, xdr_string, xdr_u32)

QEMU_PROGRAM = 0x20008087
LXC_PROGRAM = 0x00068000
PROGRAMS = {"REMOTE": REMOTE_PROGRAM, "QEMU": QEMU_PROGRAM,
            "LXC": LXC_PROGRAM}
PROGRAM_NAMES = {v: k for k, v in PROGRAMS.items()}
VIR_ERR_OPERATION_DENIED = 29
PROC_CONNECT_SET_IDENTITY = 419
PROC_CONNECT_GET_URI = 110
PROC_REGISTER_CLOSE_CALLBACK = 360
PROC_UNREGISTER_CLOSE_CALLBACK = 361

DATA = harness.REPO_ROOT / "data"


# --------------------------------------------------------------------------
# the tables, read independently of tools/gen-proctable.py
# --------------------------------------------------------------------------

def _read_tsv(path):
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = []
        for line in f:
            line = line.rstrip("\n")
            if line:
                rows.append(dict(zip(header, line.split("\t"))))
    return rows


def refusing_api(notes):
    """The API named by `refused by X`, else by the first `api=`."""
    api = None
    for part in (p.strip() for p in notes.split(";")):
        m = re.match(r"refused by (\w+)", part)
        if m:
            return m.group(1)
        if api is None and part.startswith("api="):
            api = part[4:].split(",")[0].strip()
    return api


PROCEDURES = [
    dict(r, number=int(r["number"]), api=refusing_api(r["notes"]))
    for r in _read_tsv(DATA / "procedures.tsv")
]
FLAG_RULES = {(r["program"], int(r["number"])): dict(r, value=int(r["value"]),
                                                    word=int(r["word"]))
              for r in _read_tsv(DATA / "readonly-flags.tsv")}
KNOWN = {(PROGRAMS.get(p["program"]), p["number"]) for p in PROCEDURES}
STREAM_CREATE = collections.defaultdict(set)
for _p in PROCEDURES:
    if _p["kind"] == "stream-create":
        STREAM_CREATE[PROGRAMS[_p["program"]]].add(_p["number"])


_FAMILIES = [("virNodeDevice", 22), ("virDomain", 20), ("virNetwork", 19),
             ("virStorage", 18), ("virSecret", 30), ("virInterface", 26),
             ("virNWFilter", 33)]
_CONNECT_WORDS = [("Domain", 20), ("StoragePool", 18), ("Network", 19),
                  ("NodeDevice", 22), ("Secret", 30), ("Interface", 26),
                  ("NWFilter", 33)]


def expected_domain(api):
    """libvirt error domain of the API family that refuses a call: snapshot
    APIs 35 (VIR_FROM_DOMAIN_SNAPSHOT, libvirt-domain-snapshot.c, which also
    holds virDomainRevertToSnapshot), checkpoint APIs 69, then by prefix;
    virConnect*/virNode* are VIR_FROM_DOMAIN (20, libvirt-host.c's
    VIR_FROM_THIS, as a read-only libvirt 9.0 daemon reports for
    virNodeAllocPages, virConnectCompareHypervisorCPU, ...) unless they name
    another object family."""
    if "Snapshot" in api:
        return 35
    if "Checkpoint" in api:
        return 69
    if api.startswith("virConnect") or (api.startswith("virNode")
                                        and not api.startswith("virNodeDevice")):
        for word, dom in _CONNECT_WORDS:
            if word in api:
                return dom
        return 20
    for prefix, dom in _FAMILIES:
        if api.startswith(prefix):
            return dom
    return 0


def readonly_message(api):
    return "operation forbidden: read only access prevents %s" % api


# --------------------------------------------------------------------------
# argument builders
# --------------------------------------------------------------------------

def domain_ref(dom):
    return xdr_domain(dom["name"], dom["uuid"], dom["id"])


def flag_prefix(name, dom):
    """Arguments of a `flags` procedure up to (not including) its flag words:
    the object it reads."""
    if name == "DOMAIN_SNAPSHOT_GET_XML_DESC":
        return xdr_string("virtmux-no-such-snapshot") + domain_ref(dom)
    if name == "DOMAIN_CHECKPOINT_GET_XML_DESC":
        return xdr_string("virtmux-no-such-checkpoint") + domain_ref(dom)
    if name.startswith("DOMAIN_"):
        return domain_ref(dom)
    raise AssertionError("no argument layout for flags procedure %s" % name)


def flag_cases(rule):
    """(set_values, clear_values) of the deciding word of one rule."""
    v = rule["value"]
    if rule["test"] == "mask":
        bits = [1 << i for i in range(32) if v & (1 << i)]
        other = next(1 << i for i in range(32) if not v & (1 << i))
        set_values = sorted(set(bits + [v, bits[0] | other]))
        clear_values = [0, other]
    else:
        set_values = [v]
        clear_values = sorted({0 if v else 1, v + 1})
    return set_values, clear_values


def has_flags_after(rule):
    """DOMAIN_INTERFACE_ADDRESSES decides on `source`, which a `flags` word
    follows; the XML/vcpu procedures decide on their last word, `flags`."""
    return rule["name"] == "DOMAIN_INTERFACE_ADDRESSES"


def flag_payload(rule, dom, decide, other=0):
    """Arguments with the deciding word `decide` (at index `word` after the
    object reference); for DOMAIN_INTERFACE_ADDRESSES the following `flags`
    word is `other`."""
    prefix = flag_prefix(rule["name"], dom)
    words = [0] * rule["word"] + [decide]
    if has_flags_after(rule):
        words.append(other)
    return prefix + b"".join(xdr_u32(w) for w in words)


# --------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------

Case = collections.namedtuple(
    "Case", "label prog proc payload refuse code domain message "
            "audit_name local", defaults=(False,))


def build_cases(dom):
    cases = []

    def refuse(label, prog, proc, payload, domain, message, audit_name):
        cases.append(Case(label, prog, proc, payload, True,
                          VIR_ERR_OPERATION_DENIED, domain, message,
                          audit_name))

    def forward(label, prog, proc, payload):
        cases.append(Case(label, prog, proc, payload, False, None, None,
                          None, None))

    for p in PROCEDURES:
        prog = PROGRAMS.get(p["program"])
        if prog is None:
            continue                        # KEEPALIVE: not a CALL program
        name, num = p["name"], p["number"]
        if p["program"] == "REMOTE" and p["readonly_ok"] == "no":
            assert p["kind"] in ("call", "stream-create", "event-register",
                                 "event-deregister"), p
            assert p["api"], "no refusing API in the notes of %s" % name
            dom_id = expected_domain(p["api"])
            msg = readonly_message(p["api"])
            refuse("%s empty args" % name, prog, num, b"", dom_id, msg, name)
            if name.startswith("DOMAIN_"):
                args = domain_ref(dom) + b"\0" * 32
                what = "domain args"
            else:
                args = b"\0" * 64
                what = "zero args"
            refuse("%s %s" % (name, what), prog, num, args, dom_id, msg, name)
        elif p["program"] == "REMOTE" and p["readonly_ok"] == "flags":
            rule = FLAG_RULES[("REMOTE", num)]
            assert rule["name"] == name
            msg = "operation forbidden: " + rule["message"]
            dom_id = expected_domain(p["api"])
            set_values, clear_values = flag_cases(rule)
            for v in set_values:
                refuse("%s word%d=%#x" % (name, rule["word"], v), prog, num,
                       flag_payload(rule, dom, v), dom_id, msg, name)
                if has_flags_after(rule):
                    # the last word is not the deciding one
                    refuse("%s word%d=%#x flags=5" % (name, rule["word"], v), prog,
                           num, flag_payload(rule, dom, v, other=5), dom_id,
                           msg, name)
            for v in clear_values:
                forward("%s word%d=%#x" % (name, rule["word"], v), prog, num,
                        flag_payload(rule, dom, v))
                if has_flags_after(rule):
                    forward("%s word%d=%#x flags=%#x" % (name, rule["word"], v,
                                                     rule["value"]),
                            prog, num,
                            flag_payload(rule, dom, v, other=rule["value"]))
        elif p["program"] in ("QEMU", "LXC"):
            # every procedure of these programs, whatever its kind or verdict
            # libvirt reports these refusals with VIR_FROM_NONE (0), as
            # observed through libvirt 9.0's own read-only check
            api = p["api"]
            audit = p["name"]
            if api:
                refuse("%s %s empty args" % (p["program"], name), prog, num,
                       b"", 0, readonly_message(api), audit)
                refuse("%s %s domain args" % (p["program"], name), prog, num,
                       domain_ref(dom) + b"\0" * 16, 0,
                       readonly_message(api), audit)
            else:
                refuse("%s %s empty args" % (p["program"], name), prog, num,
                       b"", None, None, audit)

    # answered by the gateway itself: allowed on read-only sessions, never
    # forwarded
    def local(label, proc, payload=b""):
        cases.append(Case(label, REMOTE_PROGRAM, proc, payload, False, None,
                          None, None, None, True))

    local("AUTH_LIST again", harness.PROC_AUTH_LIST)
    for feature in (14, 15, 8):
        local("CONNECT_SUPPORTS_FEATURE %d" % feature,
              harness.PROC_CONNECT_SUPPORTS_FEATURE, harness.xdr_i32(feature))
    local("CONNECT_GET_URI", PROC_CONNECT_GET_URI)
    local("CONNECT_REGISTER_CLOSE_CALLBACK", PROC_REGISTER_CLOSE_CALLBACK)
    local("CONNECT_UNREGISTER_CLOSE_CALLBACK", PROC_UNREGISTER_CLOSE_CALLBACK)

    # CONNECT_SET_IDENTITY is refused for everyone
    refuse("CONNECT_SET_IDENTITY", REMOTE_PROGRAM, PROC_CONNECT_SET_IDENTITY,
           xdr_u32(0) + xdr_u32(0), 0, None, "CONNECT_SET_IDENTITY")

    # procedure numbers the table does not know
    for prog, pname in ((REMOTE_PROGRAM, "REMOTE"), (QEMU_PROGRAM, "QEMU"),
                        (LXC_PROGRAM, "LXC")):
        for num in (0, 444, 9999, 0x7FFFFFFF, -1):
            if (prog, num) in KNOWN:
                continue
            refuse("%s unknown %d" % (pname, num), prog, num, b"", None, None,
                   "%s_PROC_%d" % (pname, num))
    return cases


def check_reply(case, pkt):
    """Problems with one reply, as a list of strings."""
    if not case.refuse:
        return []
    if pkt.status != STATUS_ERROR:
        return ["%s: expected an error reply, got status %d (%d bytes)"
                % (case.label, pkt.status, len(pkt.payload))]
    err = decode_error(pkt.payload)
    problems = []
    if err["code"] != case.code:
        problems.append("%s: code %d, expected %d (%s)"
                        % (case.label, err["code"], case.code,
                           err["message"]))
    if case.domain is not None and err["domain"] != case.domain:
        problems.append("%s: error domain %d, expected %d (%s)"
                        % (case.label, err["domain"], case.domain,
                           err["message"]))
    if case.message is not None and err["message"] != case.message:
        problems.append("%s: message %r, expected %r"
                        % (case.label, err["message"], case.message))
    if case.message is None and not (err["message"] or "").startswith(
            "operation forbidden"):
        problems.append("%s: message %r does not start with 'operation "
                        "forbidden'" % (case.label, err["message"]))
    return problems


MODES = ["client_flag", "listener", "rule"]


class SweepResult:
    pass


@pytest.fixture(scope="module", params=MODES)
def sweep(request, shared_libvirtd, module_gateway_factory):
    """Run the whole sweep once per way of being read-only; the tests below
    each check one aspect of the result."""
    mode = request.param
    lvd = shared_libvirtd
    tap = tapmod.Tap(lvd.port)
    request.addfinalizer(tap.stop)
    admin = "127.0.0.1:%d" % harness.free_port()
    listener = {"name": "tcp",
                "address": "127.0.0.1:%d" % harness.free_port(),
                "auth": "none"}
    if mode == "listener":
        listener["readonly"] = True
    cfg = harness.make_config([harness.upstream_entry("hv1", tap.uri())],
                              default_upstream="hv1", listeners=[listener])
    cfg["admin"] = {"address": admin}
    if mode == "rule":
        cfg["policy"] = {"default": "deny",
                         "rules": [{"match": {"listener": "tcp"},
                                    "readonly": True, "upstreams": ["hv1"]}]}
    gw = module_gateway_factory(cfg)

    def stop_gateway():
        # before the tap goes away, so the gateway does not retry a dead
        # upstream until the end of the module; a crash is still reported
        died = gw.proc.poll()
        gw.stop()
        if died is not None:
            pytest.fail("virtmux exited with %s during the %s sweep\n%s"
                        % (died, mode, gw.log_tail(40)), pytrace=False)
    request.addfinalizer(stop_gateway)

    # libvirtd's test:///default state lives while a connection holds it:
    # one held open across the sweep makes "state unchanged" meaningful
    keeper = harness.call_with_timeout(libvirt.open, lvd.direct_uri)
    request.addfinalizer(keeper.close)

    res = SweepResult()
    res.mode, res.gw, res.tap, res.lvd = mode, gw, tap, lvd
    res.state_before = tapmod.libvirtd_state(lvd.direct_uri)
    res.status_before = tapmod.admin_status(admin)

    with RawClient(port=gw.port, timeout=5.0) as c:
        c.auth_list()
        c.check_ok(c.connect_open("test:///default",
                                  1 if mode == "client_flag" else 0))
        dom = c.lookup_domain("test")
        res.mark = tap.mark()
        res.nconns_before = tap.nconns
        res.cases = build_cases(dom)
        res.replies = []
        for case in res.cases:
            pkt = c.call(case.proc, case.payload, prog=case.prog)
            res.replies.append(pkt)
            if case.proc in STREAM_CREATE.get(case.prog, ()):
                # data and end-of-stream for the refused stream's serial:
                # there is no stream, so both are dropped, never relayed
                serial = c.serial - 1
                c.send_packet(case.prog, 1, case.proc, harness.TYPE_STREAM,
                              serial, harness.STATUS_CONTINUE, b"x" * 64)
                c.send_packet(case.prog, 1, case.proc, harness.TYPE_STREAM,
                              serial, harness.STATUS_OK)
        # the session still works after the sweep
        res.after_sweep_domains = c.list_all_domains()
        res.mark_end = tap.mark()
        res.final_serial = c.serial
        # CONNECT_CLOSE is the gateway's own business too
        res.close_reply = c.call(harness.PROC_CONNECT_CLOSE)
        res.closed = c.wait_closed(3.0)
    time.sleep(0.2)
    res.after_close = [f for f in tap.since(res.mark_end)
                       if f.prog != tapmod.KEEPALIVE_PROGRAM]

    res.status_after = tapmod.admin_status(admin)
    res.state_after = tapmod.libvirtd_state(lvd.direct_uri)
    res.nconns_after = tap.nconns
    res.log = gw.log_text()
    return res


def test_every_refusal_has_libvirts_code_domain_and_message(sweep):
    problems = []
    for case, pkt in zip(sweep.cases, sweep.replies):
        problems += check_reply(case, pkt)
    nref = sum(c.refuse for c in sweep.cases)
    assert nref > 200, nref
    assert not problems, "%d of %d refusals wrong (%s session):\n  %s" % (
        len(problems), nref, sweep.mode, "\n  ".join(problems))


def _deciding_word(rule, args):
    """The deciding word, read from the front as libvirtd decodes it:
    [string name,] domain {string name; uuid[16]; int id}, then words."""
    off = 0

    def skip_string(off):
        n = struct.unpack(">I", args[off:off + 4])[0]
        return off + 4 + ((n + 3) & ~3)
    if rule["prefix"] == "name+dom":
        off = skip_string(off)
    off = skip_string(off) + 16 + 4 + 4 * rule["word"]
    return struct.unpack(">I", args[off:off + 4])[0]


def test_nothing_refused_reached_libvirtd(sweep):
    tap = sweep.tap
    frames = [f for f in tap.since(sweep.mark)
              if f.seq < sweep.mark_end]
    expected_forwarded = collections.Counter(
        (c.prog, c.proc, c.payload) for c in sweep.cases
        if not c.refuse and not c.local)
    refused_procs = {(c.prog, c.proc) for c in sweep.cases if c.refuse}
    seen = collections.Counter()
    leaked = []
    for f in frames:
        if f.prog == tapmod.KEEPALIVE_PROGRAM:
            continue                            # the gateway's own PINGs
        if f.type != 0:
            leaked.append("non-CALL frame %r" % (f,))
            continue
        if (f.prog, f.proc) == (REMOTE_PROGRAM,
                                harness.PROC_CONNECT_LIST_ALL_DOMAINS):
            continue                            # the final liveness check
        key = (f.prog, f.proc, f.args)
        if expected_forwarded[key] > seen[key]:
            seen[key] += 1
            continue
        name = "%s %d" % (PROGRAM_NAMES.get(f.prog, hex(f.prog)), f.proc)
        leaked.append("%s reached libvirtd (args %s)%s"
                      % (name, f.args[:64].hex(),
                         " [a refused procedure]"
                         if (f.prog, f.proc) in refused_procs else ""))
    assert not leaked, ("%s session: packets reached libvirtd that the "
                        "gateway should have refused:\n  %s"
                        % (sweep.mode, "\n  ".join(leaked)))
    # and the refusals did not open connections of their own (streams)
    assert sweep.nconns_after == sweep.nconns_before, (
        sweep.nconns_before, sweep.nconns_after)
    # every refused flags case carried its flag set; every forwarded one had
    # it clear (a check on the table-driven cases themselves)
    for f in frames:
        rule = FLAG_RULES.get((PROGRAM_NAMES.get(f.prog), f.proc))
        if rule and f.type == 0:
            word = _deciding_word(rule, f.args)
            is_set = (word & rule["value"] if rule["test"] == "mask"
                      else word == rule["value"])
            assert not is_set, (rule["name"], hex(word))


def test_allowed_flag_values_were_forwarded(sweep):
    """With the deciding flag clear the call is libvirtd's business: it
    reached the tap with the client's own bytes, and the reply (success or
    libvirtd's error) came back."""
    frames = sweep.tap.calls(sweep.mark)
    missing = []
    for case, pkt in zip(sweep.cases, sweep.replies):
        if case.refuse or case.local:
            continue
        if not any(f.prog == case.prog and f.proc == case.proc
                   and f.args == case.payload for f in frames):
            missing.append(case.label)
        if pkt.status == STATUS_ERROR:
            err = decode_error(pkt.payload)
            assert not (err["code"] == VIR_ERR_OPERATION_DENIED
                        and "virtmux" in (err["message"] or "")), (
                case.label, err)
    assert not missing, ("%s session: allowed calls that never reached "
                         "libvirtd: %s" % (sweep.mode, missing))
    nforward = sum(not c.refuse for c in sweep.cases)
    assert nforward >= 12, nforward


def test_local_procedures_answered_by_the_gateway(sweep):
    """AUTH_LIST, the hop features, GET_URI, the close callback and
    CONNECT_CLOSE work on a read-only session and never travel upstream
    (the tap check above covers the first ones, this one CONNECT_CLOSE)."""
    bad = []
    for case, pkt in zip(sweep.cases, sweep.replies):
        if case.local and pkt.status != harness.STATUS_OK:
            bad.append((case.label, decode_error(pkt.payload)))
    assert not bad, bad
    assert any(c.local for c in sweep.cases)
    assert sweep.close_reply.status == harness.STATUS_OK
    assert sweep.closed, "the gateway did not hang up after CONNECT_CLOSE"
    assert not sweep.after_close, sweep.after_close


def test_refused_kinds_cover_the_table(sweep):
    """The sweep itself covers every `no` REMOTE procedure (calls and
    stream-creating ones), every `flags` one, every QEMU and LXC one."""
    refused = {(c.prog, c.proc) for c in sweep.cases if c.refuse}
    for p in PROCEDURES:
        prog = PROGRAMS.get(p["program"])
        if p["program"] in ("QEMU", "LXC") or p["readonly_ok"] in ("no",
                                                                   "flags"):
            assert (prog, p["number"]) in refused, p["name"]
    kinds = collections.Counter(
        p["kind"] for p in PROCEDURES
        if p["program"] == "REMOTE" and p["readonly_ok"] == "no")
    assert kinds["stream-create"] >= 8 and kinds["call"] >= 180, kinds


def test_denial_counter_grew_by_the_number_of_refusals(sweep):
    nref = sum(c.refuse for c in sweep.cases)
    before = sweep.status_before["denials_total"]
    after = sweep.status_after["denials_total"]
    assert after - before == nref, (sweep.mode, before, after, nref)

    # per (identity, procedure, upstream) as well
    want = collections.Counter(c.audit_name for c in sweep.cases if c.refuse)
    got = collections.Counter()
    for d in sweep.status_after["denials"]:
        assert d["identity"] == "127.0.0.1@tcp", d
        assert d["upstream"] == "hv1", d
        got[d["procedure"]] += d["count"]
    for d in sweep.status_before["denials"]:
        got[d["procedure"]] -= d["count"]
    got = +got
    assert got == want, {
        "missing": dict(want - got), "unexpected": dict(got - want)}


def test_each_denial_is_logged(sweep):
    missing = []
    for name in sorted({c.audit_name for c in sweep.cases if c.refuse}):
        line = "denied: identity=127.0.0.1@tcp procedure=%s upstream=hv1" % name
        if line not in sweep.log:
            missing.append(name)
    assert not missing, "no denial log line for: %s" % missing


def test_libvirtd_state_unchanged(sweep):
    assert sweep.state_after == sweep.state_before
    assert [d["name"] for d in sweep.after_sweep_domains] == ["test"]


def test_upstream_connection_is_readonly(sweep):
    """The pool link the session rode was opened with VIR_CONNECT_RO: the
    gateway's CONNECT_OPEN on the tap carries flag bit 0, and the status
    shows a read-only pool."""
    opens = [f for f in sweep.tap.calls(0, REMOTE_PROGRAM,
                                        harness.PROC_CONNECT_OPEN)]
    assert opens, "the gateway never opened an upstream connection"
    for f in opens:
        flags = struct.unpack(">I", f.args[-4:])[0]
        assert flags & 1, "upstream CONNECT_OPEN without VIR_CONNECT_RO: %r" % (
            f,)
    pools = sweep.status_after["pools"]
    assert pools and all(p["readonly"] for p in pools), pools
    # before the sweep only the gateway's handshake and the client's lookup
    # went upstream
    early = {(f.prog, f.proc) for f in sweep.tap.frames()
             if f.seq < sweep.mark and f.prog != tapmod.KEEPALIVE_PROGRAM}
    assert early <= {(REMOTE_PROGRAM, harness.PROC_AUTH_LIST),
                     (REMOTE_PROGRAM, harness.PROC_CONNECT_SUPPORTS_FEATURE),
                     (REMOTE_PROGRAM, harness.PROC_CONNECT_OPEN),
                     (REMOTE_PROGRAM, harness.PROC_DOMAIN_LOOKUP_BY_NAME)}, \
        early
    assert not sweep.tap.parse_errors, sweep.tap.parse_errors


# --------------------------------------------------------------------------
# the deciding argument must be found where libvirtd finds it
# --------------------------------------------------------------------------

@pytest.fixture
def ro_session(libvirtd, gateway):
    tap = tapmod.Tap(libvirtd.port)
    gw = gateway.single(tap.uri())
    c = RawClient(port=gw.port, timeout=5.0)
    try:
        c.handshake(readonly=True)
        dom = c.lookup_domain("test")
        yield c, dom, tap, gw
    finally:
        c.close()
        tap.stop()


def test_trailing_bytes_do_not_hide_a_set_flag(ro_session):
    """libvirtd decodes arguments from the front and ignores bytes after the
    last field (checked below on a read-write direct connection: the padded
    call gets exactly the reply of the plain one, e.g. the secure XML), so
    GET_XML_DESC with flags=VIR_DOMAIN_XML_SECURE followed by a zero word is
    a secure-flag call. The gateway must refuse it without forwarding, like
    the same call without the padding; likewise for every `flags` rule."""
    c, dom, tap, gw = ro_session
    problems = []
    with RawClient(port=tap.target[1], timeout=5.0) as direct:
        direct.handshake()
        for (prog, num), rule in sorted(FLAG_RULES.items()):
            set_value = flag_cases(rule)[0][0]
            plain = flag_payload(rule, dom, set_value)
            for label, payload in (("+1 word", plain + xdr_u32(0)),
                                   ("+3 words", plain + b"\0" * 12)):
                name = "%s word%d=%#x %s" % (rule["name"], rule["word"], set_value,
                                         label)
                a = direct.call(num, plain)
                b = direct.call(num, payload)
                assert (a.status, a.payload) == (b.status, b.payload), (
                    "libvirtd decoded %s differently" % name)
                mark = tap.mark()
                pkt = c.call(num, payload)
                err = (decode_error(pkt.payload)
                       if pkt.status == STATUS_ERROR else {})
                if err.get("code") != VIR_ERR_OPERATION_DENIED:
                    problems.append("%s: reply %r" % (name,
                                                      err or pkt.status))
                leaked = [f for f in tap.calls(mark, REMOTE_PROGRAM, num)
                          if f.args == payload]
                if leaked:
                    problems.append(
                        "%s: reached libvirtd (args %s); libvirtd itself "
                        "answered %r" % (name, leaked[0].args.hex(),
                                         err.get("message")))
    assert not problems, ("the deciding flag is set but hidden by trailing "
                          "bytes:\n  " + "\n  ".join(problems))
