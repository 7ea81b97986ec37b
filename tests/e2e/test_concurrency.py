"""Many client sessions share a handful of upstream connections."""

import threading
import time

import libvirt
import pytest

from harness import wait_until

MAX_CONNECTIONS = 4


@pytest.fixture
def setup(libvirtd, gateway):
    gw = gateway.single(
        libvirtd.direct_uri,
        pool={"max_connections": MAX_CONNECTIONS, "max_inflight": 4,
              "idle_timeout_s": 60},
        limits={"max_clients": 10000, "queue_timeout_ms": 30000,
                "max_client_requests": 16})
    return libvirtd, gw


def expected_info(lvd):
    conn = libvirt.open(lvd.direct_uri)
    try:
        return conn.lookupByName("test").info()[:4]
    finally:
        conn.close()


def test_200_sessions_share_max_connections(setup):
    lvd, gw = setup
    expected = expected_info(lvd)
    # from here on only the gateway's sockets count
    assert wait_until(lambda: lvd.nclients() == 0, 5.0)

    nsessions = 200
    min_iterations = 20
    connected = threading.Barrier(nsessions + 1)
    stop = threading.Event()
    errors = []
    wrong = []
    counts = [0] * nsessions

    def worker(i):
        conn = None
        try:
            conn = libvirt.open(gw.uri())
            dom = conn.lookupByName("test")
            connected.wait(60)
            n = 0
            while n < min_iterations or (not stop.is_set() and n < 500):
                info = dom.info()
                if info[:4] != expected:
                    wrong.append((i, info))
                n += 1
            counts[i] = n
        except threading.BrokenBarrierError:
            errors.append((i, "barrier broken"))
        except Exception as e:
            errors.append((i, repr(e)))
            connected.abort()
        finally:
            if conn is not None:
                try:
                    conn.close()
                except libvirt.libvirtError as e:
                    errors.append((i, "close: %r" % e))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(nsessions)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        connected.wait(60)              # all 200 sessions are open now
    except threading.BrokenBarrierError:
        pass
    samples = []
    try:
        for _ in range(5):
            samples.append(lvd.nclients())
            time.sleep(0.2)
    finally:
        stop.set()
    deadline = time.monotonic() + 90
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    elapsed = time.monotonic() - t0
    after = lvd.nclients()

    assert hung == 0, "%d sessions hung" % hung
    assert not errors, errors[:10]
    assert not wrong, wrong[:10]
    assert all(c >= min_iterations for c in counts)
    assert samples and all(1 <= s <= MAX_CONNECTIONS for s in samples), samples
    assert 1 <= after <= MAX_CONNECTIONS, after
    print("200 sessions, %d calls in %.1f s, upstream sockets %s then %d"
          % (sum(counts), elapsed, samples, after))


def test_threads_pipelining_on_one_connection(setup):
    """16 threads share one libvirt connection: calls are pipelined on the
    client socket and their replies must reach the right caller."""
    lvd, gw = setup
    expected = expected_info(lvd)
    conn = libvirt.open(gw.uri())
    errors = []
    results = []

    def worker(i):
        try:
            dom = conn.lookupByName("test")
            for j in range(25):
                # mix calls with different reply types
                if j % 5 == 0:
                    names = sorted(d.name() for d in conn.listAllDomains())
                    results.append(names == ["test"])
                else:
                    results.append(dom.info()[:4] == expected)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "threads hung"
        assert not errors, errors[:5]
        assert len(results) == 16 * 25 and all(results)
        assert 1 <= lvd.nclients() <= MAX_CONNECTIONS
    finally:
        conn.close()


def test_sessions_come_and_go(setup):
    """Open/close churn: upstream sockets are reused, not one per client."""
    lvd, gw = setup
    expected = expected_info(lvd)
    errors = []

    def worker():
        try:
            for _ in range(10):
                conn = libvirt.open(gw.uri())
                try:
                    if conn.lookupByName("test").info()[:4] != expected:
                        errors.append("wrong info")
                finally:
                    conn.close()
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, errors[:5]
    assert 1 <= lvd.nclients() <= MAX_CONNECTIONS
