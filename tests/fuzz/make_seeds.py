#!/usr/bin/env python3
"""Write the seed inputs of fuzz_uri, fuzz_policy and fuzz_session into corpus/<harness>/.

Seeds only give the fuzzer a start (a valid open, an event registration, a stream, ...); the
corpus also keeps every input that ever crashed a harness (crash-*), which this script leaves
alone. Run it again after changing the input format of a harness:

    python3 tests/fuzz/make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- fuzz_uri: "URI\nNAME\nLISTENER-UPSTREAM" ----
URIS = {
    "tcp": b"qemu+tcp://10.0.0.1:16509/system\nqemu:///hv2/system\n",
    "tls-v6": b"qemu+tls://[fe80::1]:16514/system?no_verify=1\ntest:///lab/default\nlab",
    "unix": b"qemu+unix:///system?socket=/run/libvirt/libvirt-sock&mode=legacy\n\nhv2",
    "user": b"test+tcp://root@gw/default\ntest+tcp://gw/hv1?x=1#f\n",
    "bad-port": b"qemu+tcp://h:99999/system\nqemu:///hv2\n",
    "name-param": b"qemu:///system?name=x\nqemu:///nothing/here\nnone",
}
for k, v in URIS.items():
    write("fuzz_uri", k, v)

# ---- fuzz_policy: prog selector, proc (2 bytes), argument bytes ----
def xdr_string(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b + b"\0" * ((4 - len(b) % 4) % 4)

DOM = xdr_string("test") + bytes(16) + struct.pack(">i", 1)
POLICY = {
    "getinfo": (0, 16, DOM),                        # DOMAIN_GET_INFO: read-only
    "destroy": (0, 12, DOM),                        # DOMAIN_DESTROY: refused
    "xmldesc-secure": (0, 14, DOM + struct.pack(">I", 1)),   # GET_XML_DESC flags
    "xmldesc-plain": (0, 14, DOM + struct.pack(">I", 0)),
    "snapshot-xml": (0, 186, xdr_string("s1") + DOM + struct.pack(">I", 1)),
    "qemu-monitor": (1, 1, DOM + xdr_string("info") + struct.pack(">I", 0)),
    "unknown": (3, 9999 & 0xffff, b""),
    "short": (0, 14, DOM[:10]),
}
for k, (prog, proc, args) in POLICY.items():
    write("fuzz_policy", k, bytes([prog]) + struct.pack(">H", proc) + args)

# ---- fuzz_session: config byte, then operations (op = client << 4 | kind) ----
RAW, CALL, OPEN, PUMP, HANGUP, EVENT, UPRAW, UPDROP, TOGGLE, REG, DEREG, STREAM, KA, LOCAL, SASL, LOGIN = range(16)


def op(kind, who=0, *args):
    return bytes([who << 4 | kind]) + bytes(args)


def call(who, prog, proc, serial, payload=b""):
    return op(CALL, who, prog, proc >> 8, proc & 0xff, serial, len(payload)) + payload


def open_(who, name_sel=0, flags=0, serial=1):
    return op(OPEN, who, name_sel, flags, serial)


def pump(n=20):
    return op(PUMP, 0, n)


SESSION = {
    # open "", a few forwarded calls, close
    "open-calls": bytes([0]) + open_(0) + pump() + call(0, 0, 16, 2, DOM) + call(0, 0, 4, 3)
    + pump() + op(LOCAL, 0, 0, 4) + pump(),
    # routed open by segment, URI, close callback
    "open-routed": bytes([0]) + open_(0, 2) + pump() + op(LOCAL, 0, 1, 2) + op(LOCAL, 0, 2, 3)
    + pump() + op(LOCAL, 0, 3, 4) + pump(),
    # an unroutable name, then the default
    "open-refused": bytes([0]) + open_(0, 3) + pump() + open_(0, 0, 0, 2) + pump(),
    # read-only listener: allowed and refused calls
    "readonly": bytes([8]) + open_(1, 1, 1) + pump() + call(1, 0, 16, 2, DOM)
    + call(1, 0, 12, 3, DOM) + call(1, 0, 14, 4, DOM + struct.pack(">I", 1)) + pump(),
    # three subscribers of one domain event (callback family), events fanned out, one leaves, deregistration
    "events-fanout": bytes([0]) + open_(0) + open_(1) + open_(2) + pump()
    + op(REG, 0, 3, 0, 5) + op(REG, 1, 3, 0, 5) + op(REG, 2, 3, 0, 5) + pump()
    + op(EVENT, 0, 0, 1, 8, 0, 0, 0, 4, 116, 101, 115, 116) + op(EVENT, 0, 0, 3, 0) + pump()
    + op(HANGUP, 1) + op(DEREG, 0, 3, 0, 6) + pump() + op(EVENT, 0, 0, 1, 0) + pump(),
    # legacy registration is refused (so is the pre-callback REGISTER_ANY)
    "events-legacy": bytes([0]) + open_(0) + pump() + call(0, 0, 105, 2) + op(REG, 0, 1, 0, 3) + pump(),
    # a stream (DOMAIN_SCREENSHOT): create, data, end; and one abandoned mid-way
    "stream": bytes([0]) + open_(0) + pump() + op(STREAM, 0, 4, 0, 9, 0) + pump()
    + op(STREAM, 0, 4, 1, 9, 4, 1, 2, 3, 4) + op(STREAM, 0, 4, 2, 9, 0) + pump()
    + op(STREAM, 0, 4, 0, 10, 0) + op(STREAM, 0, 4, 1, 10, 1, 7) + pump(),
    # keepalive and features, before and after open
    "keepalive": bytes([0]) + op(KA, 0, 1) + op(KA, 0, 20, 1) + op(KA, 0, 28, 2) + open_(0, 0, 0, 3)
    + pump() + op(KA, 0, 28, 4) + op(KA, 0, 16, 5) + op(KA, 0, 3) + pump(),
    # libvirtd dies with calls in flight; the pool reconnects
    "upstream-drop": bytes([2]) + open_(0) + pump() + call(0, 0, 16, 2, DOM) + call(0, 0, 16, 3, DOM)
    + op(UPDROP, 0, 0) + pump() + call(0, 0, 16, 4, DOM) + pump(40),
    # a client that stops reading while events pile up
    "slow-reader": bytes([0]) + open_(0) + open_(1) + pump() + op(REG, 0, 3, 0, 2)
    + op(REG, 1, 3, 0, 2) + pump() + op(TOGGLE, 1)
    + b"".join(op(EVENT, 0, 0, 1, 200, *range(200)) for _ in range(20)) + pump(),
    # idle timeout 0, one connection, one slot, errors every other call
    "tight-pool": bytes([1 | 2 | 4 | 64 | 16]) + open_(0) + open_(1) + pump()
    + b"".join(call(w, 0, 16, s, DOM) for s in range(2, 8) for w in (0, 1)) + pump(40)
    + op(LOCAL, 0, 0, 9) + pump(),
    # garbage from the client: bad length word, unknown type, CALL_WITH_FDS
    "client-junk": bytes([0]) + op(RAW, 0, 8, 0, 0, 0, 3, 1, 2, 3, 4)
    + op(RAW, 1, 32, *struct.pack(">7I", 32, 0x20008086, 1, 1, 4, 1, 0), 0, 0, 0, 2) + op(RAW, 1, 2, 0, 0)
    + pump(),
    # junk from libvirtd: a stray reply and an illegal length word
    "upstream-junk": bytes([0]) + open_(0) + pump()
    + op(UPRAW, 0, 0, 28, *struct.pack(">7I", 28, 0x20008086, 1, 16, 1, 77, 0)) + pump()
    + op(UPRAW, 0, 0, 4, 0, 0, 0, 1) + pump(40),
    # libvirtd stops answering (a frame it never finishes) while the client has its
    # max_client_requests (2) calls outstanding, so the gateway stops reading it; then the
    # client hangs up: its session must still end (it did not: reading off, EOF unseen)
    "paused-hangup": bytes([4]) + open_(0) + pump() + op(UPRAW, 0, 0, 4, 0, 0, 1, 0) + pump()
    + call(0, 0, 16, 2, DOM) + call(0, 0, 16, 3, DOM) + pump() + op(HANGUP, 0) + pump(),
    # the same, but the client leaves a reply unread and sends more while paused: its hang-up
    # is then a reset, which epoll reports as readable, not as EV_CLOSED
    "paused-reset": bytes([4]) + open_(0) + pump() + op(TOGGLE, 0) + open_(0, 0, 0, 2) + pump()
    + op(UPRAW, 0, 0, 4, 0, 0, 1, 0) + pump() + call(0, 0, 16, 3, DOM) + call(0, 0, 16, 4, DOM)
    + pump() + call(0, 0, 16, 5, DOM) + pump() + op(HANGUP, 0) + pump(),
    # policy variant: client 0 may reach hv1 once at a time, not hv2; client 1 is forced
    # read-only; client 2 is on the SASL listener and must log in first
    "policy": bytes([128]) + open_(0) + pump() + open_(0, 8, 0, 2) + pump() + op(HANGUP, 0)
    + open_(0, 8) + pump() + open_(0, 0, 0, 2) + pump()
    + open_(1) + pump() + call(1, 0, 12, 2, DOM) + call(1, 0, 16, 3, DOM) + pump()
    + open_(2, 8) + op(LOCAL, 2, 4, 2) + op(SASL, 2, 0, 3, 0) + pump()
    + op(SASL, 2, 1, 4, 8, *b"n,,n=fuz") + pump() + op(SASL, 2, 2, 5, 4, *b"c=bi") + pump(),
    # SASL: DIGEST-MD5 start with no token, a step with a nil token, a repeated start
    "sasl-digest": bytes([128]) + op(SASL, 2, 0, 1, 0) + pump() + op(SASL, 2, 5, 2, 0) + pump()
    + op(SASL, 2, 0x82, 3, 0) + op(SASL, 2, 5, 4, 0) + pump() + open_(2, 8, 0, 5) + pump(),
    # a DIGEST-MD5 login with the security layer (client 2 is a TCP peer of the SASL
    # listener), then everything inside the layer: open hv2, calls, events, a stream, and a
    # client that stops reading
    "sasl-layer": bytes([128]) + op(LOGIN, 2) + pump() + open_(2, 8) + pump()
    + call(2, 0, 16, 2, DOM) + op(REG, 2, 3, 0, 3) + pump() + op(EVENT, 0, 0, 1, 4, 0, 0, 0, 0)
    + pump() + op(STREAM, 2, 4, 0, 9, 0) + pump() + op(STREAM, 2, 4, 1, 9, 4, 1, 2, 3, 4)
    + op(STREAM, 2, 4, 2, 9, 0) + pump() + op(TOGGLE, 2)
    + b"".join(op(EVENT, 0, 0, 1, 200, *range(200)) for _ in range(10)) + pump()
    + op(LOCAL, 2, 0, 10) + pump(),
}
for k, v in SESSION.items():
    write("fuzz_session", k, v)


# ---- fuzz_grant: procedure index (2 bytes), flags, call arguments [0xffffffff reply] ----
def grant_named():
    """(program, name) of the procedures that name objects, in the generated table's order."""
    order = {"LXC": 0, "REMOTE": 1, "QEMU": 2, "KEEPALIVE": 3}
    rows = []
    with open(os.path.join(HERE, "..", "..", "data", "procedures.tsv"), encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            r = dict(zip(header, line.rstrip("\n").split("\t")))
            if r.get("objects", "none") != "none":
                rows.append((order[r["program"]], int(r["number"]), r["program"], r["name"]))
    rows.sort()
    return {(p, n): i for i, (_, _, p, n) in enumerate(rows)}


NAMED = grant_named()
SEP = b"\xff" * 4
ALL_FAMILIES_TEST = 1 | 2 | 4 | 8


def dom(name, u, i=1):
    return xdr_string(name) + bytes([u]) * 16 + struct.pack(">i", i)


def net(name, u):
    return xdr_string(name) + bytes([u]) * 16


def gseed(name, flags, body):
    return struct.pack(">H", NAMED[("REMOTE", name)]) + bytes([flags]) + body


GRANT = {
    "list-all": gseed("CONNECT_LIST_ALL_DOMAINS", ALL_FAMILIES_TEST, struct.pack(">iI", 1, 0)
                      + SEP + struct.pack(">I", 3) + dom("web-1", 1) + dom("vault-1", 2)
                      + dom("web-2", 3, -1) + struct.pack(">I", 3)),
    "count-only": gseed("CONNECT_LIST_ALL_DOMAINS", ALL_FAMILIES_TEST, struct.pack(">iI", 0, 0)
                        + SEP + struct.pack(">I", 1) + dom("web-1", 1) + struct.pack(">I", 1)),
    "list-ids": gseed("CONNECT_LIST_DOMAINS", ALL_FAMILIES_TEST, struct.pack(">i", 10) + SEP
                      + struct.pack(">I", 2) + dom("web-1", 1) + dom("vault-1", 2)
                      + struct.pack(">I", 2)),
    "stats": gseed("CONNECT_GET_ALL_DOMAIN_STATS", ALL_FAMILIES_TEST, struct.pack(">III", 0, 0, 0)
                   + SEP + struct.pack(">I", 2) + dom("web-1", 1) + struct.pack(">I", 2)
                   + xdr_string("state.state") + struct.pack(">ii", 1, 1)
                   + xdr_string("balloon.current") + struct.pack(">iQ", 4, 8192)
                   + dom("vault-1", 2) + struct.pack(">I", 1) + xdr_string("x")
                   + struct.pack(">i", 7) + xdr_string("y")),
    "lookup-uuid": gseed("DOMAIN_LOOKUP_BY_UUID", 1 | 8, bytes([2]) * 16 + SEP + dom("vault-1", 2)),
    "lookup-name": gseed("DOMAIN_LOOKUP_BY_NAME", 1, xdr_string("web-1") + SEP + dom("web-1", 1)),
    "define": gseed("DOMAIN_DEFINE_XML_FLAGS", 1 | 8,
                    xdr_string("<domain type='test'><!-- c --><name>web-3</name></domain>")
                    + struct.pack(">I", 0) + SEP + dom("web-3", 9)),
    "getinfo": gseed("DOMAIN_GET_INFO", 1, dom("web-1", 1)),
    "snapshot": gseed("DOMAIN_SNAPSHOT_GET_XML_DESC", 1, xdr_string("s1") + dom("web-1", 1)
                      + struct.pack(">I", 0)),
    "rename": gseed("DOMAIN_RENAME", 1, dom("web-1", 1) + struct.pack(">I", 1)
                    + xdr_string("vault-2") + struct.pack(">I", 0)),
    "net-list": gseed("CONNECT_LIST_NETWORKS", 2 | 8, struct.pack(">i", 5) + SEP
                      + struct.pack(">I", 2) + net("net-a", 1) + net("net-b", 2)
                      + struct.pack(">I", 2)),
    "vol-lookup": gseed("STORAGE_VOL_LOOKUP_BY_PATH", 4 | 8, xdr_string("/pool-x/vx") + SEP
                        + xdr_string("pool-x") + xdr_string("vx") + xdr_string("/pool-x/vx")),
    "clone": gseed("STORAGE_VOL_CREATE_XML_FROM", 4, net("pool-a", 1)
                   + xdr_string("<volume/>") + xdr_string("pool-x") + xdr_string("v")
                   + xdr_string("k") + struct.pack(">I", 0)),
    "event": gseed("DOMAIN_EVENT_CALLBACK_LIFECYCLE", 1, struct.pack(">i", 3) + dom("web-1", 1)
                   + struct.pack(">ii", 2, 0)),
}
for k, v in GRANT.items():
    write("fuzz_grant", k, v)
