/* Golden-byte tests of the wire codec. The expected bytes come from packets observed between a
 * libvirt 9.0.0 client and daemon (docs: the open call with "qemu:///system", flags 1). */
#include <stdlib.h>

#include <event2/buffer.h>

#include "check.h"
#include "proc.h"
#include "wire.h"

static size_t drain_all(struct evbuffer *b, unsigned char *out, size_t cap)
{
    size_t n = evbuffer_get_length(b);
    if (n > cap) n = cap;
    evbuffer_remove(b, out, n);
    return n;
}

static void test_open_call_golden(void)
{
    unsigned char want[128], got[128];
    size_t wn = hex_bytes("00000038 20008086 00000001 00000001 00000000 00000002 00000000"
                          " 00000001 0000000e 71656d753a2f2f2f73797374656d0000 00000001",
                          want, sizeof(want));
    struct xbuf b;
    xb_init(&b);
    xb_opt_string(&b, "qemu:///system");
    xb_u32(&b, 1);
    struct evbuffer *out = evbuffer_new();
    wire_put_packet(out, VM_PROG_REMOTE, VM_PROC_CONNECT_OPEN, VM_CALL, 2, VM_STATUS_OK, b.p, b.len);
    size_t gn = drain_all(out, got, sizeof(got));
    CHECK(gn == wn && wn == 0x38);
    CHECK(memcmp(got, want, wn) == 0);

    /* Decoding the same bytes gives back the fields. */
    struct vm_hdr h;
    wire_hdr_decode(want, &h);
    CHECK(h.len == 0x38 && h.prog == VM_PROG_REMOTE && h.vers == 1 && h.proc == 1);
    CHECK(h.type == VM_CALL && h.serial == 2 && h.status == VM_STATUS_OK);
    unsigned char re[VM_HDR_LEN];
    wire_hdr_encode(&h, re);
    CHECK(memcmp(re, want, VM_HDR_LEN) == 0);

    struct xrd r;
    int present;
    xr_init(&r, want + VM_HDR_LEN, wn - VM_HDR_LEN);
    char *name = xr_opt_string(&r, 4096, &present);
    uint32_t flags = xr_u32(&r);
    CHECK(!r.err && present);
    CHECK_STR(name, "qemu:///system");
    CHECK(flags == 1);
    free(name);
    xb_free(&b);
    evbuffer_free(out);
}

static void test_keepalive_golden(void)
{
    unsigned char want[28], got[64];
    hex_bytes("0000001c 6b656570 00000001 00000001 00000002 00000000 00000000", want, sizeof(want));
    struct evbuffer *out = evbuffer_new();
    wire_put_keepalive(out, VM_PROC_KEEPALIVE_PING);
    CHECK(drain_all(out, got, sizeof(got)) == 28);
    CHECK(memcmp(got, want, 28) == 0);
    wire_put_keepalive(out, VM_PROC_KEEPALIVE_PONG);
    drain_all(out, got, sizeof(got));
    CHECK(got[15] == 2);
    evbuffer_free(out);
}

static void test_error_golden(void)
{
    /* REPLY/ERROR for DOMAIN_GET_INFO serial 7: code 68, domain 7, message "operation timed
     * out: x", level 2, every optional field absent, ints 0. */
    unsigned char want[256], got[256];
    size_t wn = hex_bytes("00000064 20008086 00000001 00000010 00000001 00000007 00000001"
                          " 00000044 00000007"
                          " 00000001 00000016 6f7065726174696f6e2074696d6564206f75743a20780000"
                          " 00000002 00000000 00000000 00000000 00000000 00000000 00000000 00000000",
                          want, sizeof(want));
    struct vm_hdr call = {.len = 28, .prog = VM_PROG_REMOTE, .vers = 1, .proc = 16,
                          .type = VM_CALL, .serial = 7, .status = 0};
    struct evbuffer *out = evbuffer_new();
    wire_put_error(out, &call, VIR_ERR_OPERATION_TIMEOUT, VIR_FROM_RPC, "operation timed out: x");
    size_t gn = drain_all(out, got, sizeof(got));
    CHECK(gn == wn);
    CHECK(memcmp(got, want, wn) == 0);

    int code, dom;
    char msg[64];
    CHECK(wire_error_decode(want + 28, wn - 28, &code, &dom, msg, sizeof(msg)) == 0);
    CHECK(code == 68 && dom == 7);
    CHECK_STR(msg, "operation timed out: x");
    evbuffer_free(out);
}

static void test_framing(void)
{
    CHECK(!wire_len_ok(0));
    CHECK(!wire_len_ok(8));
    CHECK(!wire_len_ok(27));
    CHECK(wire_len_ok(28));
    CHECK(wire_len_ok(VM_LEN_MAX));
    CHECK(!wire_len_ok(VM_LEN_MAX + 1));
    CHECK(!wire_len_ok(0x7fffffff));

    struct evbuffer *in = evbuffer_new();
    uint32_t len = 0;
    unsigned char pkt[28];
    hex_bytes("0000001c 20008086 00000001 00000042 00000000 00000000 00000000", pkt, sizeof(pkt));
    /* Byte at a time: nothing is ready until the 28th byte. */
    for (int i = 0; i < 27; i++) {
        evbuffer_add(in, pkt + i, 1);
        CHECK(wire_frame_ready(in, &len) == 0);
    }
    evbuffer_add(in, pkt + 27, 1);
    CHECK(wire_frame_ready(in, &len) == 1 && len == 28);
    evbuffer_drain(in, 28);

    /* An oversize length word is refused on the word alone, before any payload arrives. */
    unsigned char big[4] = {0x02, 0x00, 0x00, 0x05}; /* 33554437 */
    evbuffer_add(in, big, 4);
    CHECK(wire_frame_ready(in, &len) == -1);
    evbuffer_drain(in, 4);
    unsigned char small[4] = {0, 0, 0, 8};
    evbuffer_add(in, small, 4);
    CHECK(wire_frame_ready(in, &len) == -1);
    evbuffer_free(in);
}

static void test_serial_rewrite(void)
{
    unsigned char pkt[32];
    hex_bytes("00000020 20008086 00000001 00000010 00000001 00000005 00000000 deadbeef", pkt,
              sizeof(pkt));
    struct evbuffer *b = evbuffer_new();
    /* Split the header across two chains to prove the rewrite copes. */
    evbuffer_add(b, pkt, 10);
    struct evbuffer *tail = evbuffer_new();
    evbuffer_add(tail, pkt + 10, 22);
    evbuffer_add_buffer(b, tail);
    wire_set_serial(b, 0x01020304);
    struct vm_hdr h;
    wire_hdr_peek(b, &h);
    CHECK(h.serial == 0x01020304 && h.proc == 16 && h.type == VM_REPLY);
    unsigned char got[32];
    CHECK(drain_all(b, got, sizeof(got)) == 32);
    CHECK(memcmp(got + 28, pkt + 28, 4) == 0);
    evbuffer_free(b);
    evbuffer_free(tail);
}

static void test_xdr_reader_bounds(void)
{
    unsigned char buf[64];
    struct xrd r;
    /* A string whose length runs past the buffer. */
    size_t n = hex_bytes("00000010 41424344", buf, sizeof(buf));
    xr_init(&r, buf, n);
    char *s = xr_string(&r, 4096);
    CHECK(s == NULL && r.err);
    /* A string over the limit. */
    n = hex_bytes("00000008 41424344 45464748", buf, sizeof(buf));
    xr_init(&r, buf, n);
    CHECK(xr_string(&r, 4) == NULL && r.err);
    /* Embedded NUL. */
    n = hex_bytes("00000004 41004344", buf, sizeof(buf));
    xr_init(&r, buf, n);
    CHECK(xr_string(&r, 4096) == NULL && r.err);
    /* Presence flag must be 0 or 1. */
    int present;
    n = hex_bytes("00000002", buf, sizeof(buf));
    xr_init(&r, buf, n);
    CHECK(xr_opt_string(&r, 4096, &present) == NULL && r.err);
    /* Padding is consumed: the next word is read correctly. */
    n = hex_bytes("00000001 41000000 0000002a", buf, sizeof(buf));
    xr_init(&r, buf, n);
    s = xr_string(&r, 4096);
    CHECK_STR(s, "A");
    CHECK(xr_u32(&r) == 42 && !r.err);
    free(s);
    /* Sticky error: reading past the end keeps err set. */
    CHECK(xr_u32(&r) == 0 && r.err);
}

static void test_sasl_chars(void)
{
    /* XDR char is an int: "ab" is nil=0, count 2, then one 4-byte word per char. */
    unsigned char want[16], buf[8];
    hex_bytes("00000000 00000002 00000061 00000062", want, sizeof(want));
    struct xbuf b;
    xb_init(&b);
    xb_nil_chars(&b, "ab", 2);
    CHECK(b.len == 16 && memcmp(b.p, want, 16) == 0);
    struct xrd r;
    unsigned len;
    int nil;
    xr_init(&r, b.p, b.len);
    CHECK(xr_nil_chars(&r, buf, sizeof(buf), &len, &nil) == 0 && len == 2 && !nil);
    CHECK(buf[0] == 'a' && buf[1] == 'b');
    /* NULL data is nil=1 with no chars; a count above the buffer is an error. */
    b.len = 0;
    xb_nil_chars(&b, NULL, 5);
    hex_bytes("00000001 00000000", want, sizeof(want));
    CHECK(b.len == 8 && memcmp(b.p, want, 8) == 0);
    xr_init(&r, want, 8);
    CHECK(xr_nil_chars(&r, buf, sizeof(buf), &len, &nil) == 0 && nil == 1 && len == 0);
    hex_bytes("00000000 00000009", want, sizeof(want));
    xr_init(&r, want, 8);
    CHECK(xr_nil_chars(&r, buf, sizeof(buf), &len, &nil) < 0 && r.err);
    /* Skipping a string lands on the next word; a string past the end is an error. */
    hex_bytes("00000005 68656c6c 6f000000 0000002a", want, sizeof(want));
    xr_init(&r, want, 16);
    xr_skip_string(&r);
    CHECK(xr_u32(&r) == 42 && !r.err);
    xr_init(&r, want, 8);
    xr_skip_string(&r);
    CHECK(r.err);
    xb_free(&b);
}

int main(void)
{
    test_open_call_golden();
    test_keepalive_golden();
    test_error_golden();
    test_framing();
    test_serial_rewrite();
    test_xdr_reader_bounds();
    test_sasl_chars();
    return check_done();
}
