"""Keepalive on the client hop, checked with raw packets."""

import time

import pytest

import harness
from harness import (KEEPALIVE_PROGRAM, PROC_KEEPALIVE_PING,
                     PROC_KEEPALIVE_PONG, TYPE_MESSAGE, RawClient, XdrReader,
                     xdr_i32)

INTERVAL = 1
COUNT = 2
FEATURE_PROGRAM_KEEPALIVE = 10


@pytest.fixture(scope="module")
def gw(shared_libvirtd, module_gateway_factory):
    return module_gateway_factory.single(
        shared_libvirtd.direct_uri,
        keepalive={"interval_s": INTERVAL, "count": COUNT})


def is_ping(pkt):
    return (pkt.prog, pkt.vers, pkt.proc, pkt.type, pkt.serial, pkt.status,
            pkt.length, pkt.payload) == (KEEPALIVE_PROGRAM, 1,
                                         PROC_KEEPALIVE_PING, TYPE_MESSAGE,
                                         0, 0, 28, b"")


def ask_keepalive(c):
    pkt = c.check_ok(c.call(harness.PROC_CONNECT_SUPPORTS_FEATURE,
                            xdr_i32(FEATURE_PROGRAM_KEEPALIVE)))
    return XdrReader(pkt.payload).i32()


def test_no_ping_without_feature_negotiation(gw):
    with RawClient(port=gw.port) as c:
        c.handshake()
        received = []
        deadline = time.monotonic() + INTERVAL * (COUNT + 1) + 1.0
        while time.monotonic() < deadline:
            try:
                received.append(c.recv_packet(
                    timeout=max(0.05, deadline - time.monotonic())))
            except OSError:         # socket.timeout
                break
        assert received == [], received
        # and the silent client was not dropped
        assert [d["name"] for d in c.list_all_domains()] == ["test"]


def test_ping_answered_with_pong(gw):
    with RawClient(port=gw.port) as c:
        c.handshake()
        c.send_packet(KEEPALIVE_PROGRAM, 1, PROC_KEEPALIVE_PING, TYPE_MESSAGE,
                      0)
        pkt = c.recv_packet(timeout=2.0)
        assert (pkt.prog, pkt.vers, pkt.proc, pkt.type, pkt.serial,
                pkt.status, pkt.length) == (KEEPALIVE_PROGRAM, 1,
                                            PROC_KEEPALIVE_PONG, TYPE_MESSAGE,
                                            0, 0, 28)


def test_ping_answered_before_open(gw):
    with RawClient(port=gw.port) as c:
        c.send_packet(KEEPALIVE_PROGRAM, 1, PROC_KEEPALIVE_PING, TYPE_MESSAGE,
                      0)
        pkt = c.recv_packet(timeout=2.0)
        assert (pkt.prog, pkt.proc, pkt.type) == \
            (KEEPALIVE_PROGRAM, PROC_KEEPALIVE_PONG, TYPE_MESSAGE)


def test_negotiated_client_is_pinged_and_stays_if_it_answers(gw):
    with RawClient(port=gw.port) as c:
        assert c.auth_list() == [0]
        assert ask_keepalive(c) == 1
        c.check_ok(c.connect_open())
        pings = 0
        deadline = time.monotonic() + INTERVAL * (COUNT + 1) + 1.5
        while time.monotonic() < deadline:
            try:
                pkt = c.recv_packet(timeout=max(0.05, deadline
                                                - time.monotonic()))
            except OSError:
                break
            assert is_ping(pkt), pkt
            pings += 1
            c.send_packet(KEEPALIVE_PROGRAM, 1, PROC_KEEPALIVE_PONG,
                          TYPE_MESSAGE, 0)
        assert pings >= 2
        # still connected and working
        assert [d["name"] for d in c.list_all_domains()] == ["test"]


def test_negotiated_client_that_never_answers_is_dropped(gw):
    with RawClient(port=gw.port) as c:
        assert c.auth_list() == [0]
        assert ask_keepalive(c) == 1
        c.check_ok(c.connect_open())
        t0 = time.monotonic()
        closed = c.wait_closed(INTERVAL * (COUNT + 1) + 3.0)
        elapsed = time.monotonic() - t0
        assert closed, "dead client kept for %.1f s" % elapsed
        assert c.drained and all(is_ping(p) for p in c.drained), c.drained
        assert elapsed >= INTERVAL * COUNT - 0.5, elapsed
