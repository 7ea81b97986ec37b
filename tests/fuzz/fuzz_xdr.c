/* Fuzz the XDR reader and the payload decoders built on it.
 *
 * Input: byte 0 picks the decoder, the rest is its payload.
 *   0  a program of reader operations: byte 1 = number of operations N (mod 32), then N
 *      operation bytes, then the XDR data they are applied to
 *   1  CONNECT_OPEN arguments, decoded as session.c does (optional name, flags), then routed
 *   2  AUTH_SASL_START arguments (mechanism, token pair) as auth.c decodes them
 *   3  AUTH_SASL_STEP arguments (token pair) and the upstream's START/STEP reply
 *   4  a virNetMessageError payload (wire_error_decode), re-encoded and decoded again
 *   5  call arguments judged by the read-only allowlist (policy_readonly_allows) as the
 *      arguments of every procedure of the table: verdicts agree with the table, and an
 *      allowed "flags" call stays allowed with bytes appended (libvirtd ignores them)
 * Invariants checked on every path: the read offset never passes the end, errors are sticky,
 * what decodes re-encodes to an equal value. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "config.h"
#include "fuzz.h"
#include "policy.h"
#include "proc.h"
#include "router.h"
#include "wire.h"

static struct vm_config *route_cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static const char json[] =
        "{\"listeners\": [{\"name\": \"l\", \"unix\": \"/nonexistent/l.sock\"}],"
        " \"upstreams\": [{\"name\": \"hv1\", \"uri\": \"test+tcp://127.0.0.1:1/default\"},"
        "                 {\"name\": \"hv2\", \"uri\": \"qemu+unix:///system?socket=/x\"}],"
        " \"default_upstream\": \"hv1\"}";
    route_cfg = config_parse(json, stderr);
    if (!route_cfg)
        abort();
    return 0;
}

static void check_reader(const struct xrd *r)
{
    if (r->off > r->len || (r->off & 3) != 0)
        abort();
}

/* A decoded string must be what the wire said: its length word, its bytes, no NUL. */
static void check_string(const struct xrd *r, size_t before, const char *s)
{
    if (!s)
        return;
    size_t n = strlen(s);
    uint32_t word = (uint32_t)r->p[before] << 24 | (uint32_t)r->p[before + 1] << 16 |
                    (uint32_t)r->p[before + 2] << 8 | r->p[before + 3];
    if (word != n || memcmp(r->p + before + 4, s, n) != 0 ||
        r->off != before + 4 + ((n + 3) & ~(size_t)3))
        abort();
}

static void run_ops(const uint8_t *data, size_t size)
{
    if (size < 1)
        return;
    size_t nops = data[0] % 32;
    data++;
    size--;
    if (nops > size)
        nops = size;
    const uint8_t *ops = data;
    struct xrd r;
    xr_init(&r, data + nops, size - nops);
    static uint8_t buf[65536];
    for (size_t i = 0; i < nops; i++) {
        int was_err = r.err;
        size_t before = r.off;
        switch (ops[i] % 7) {
        case 0:
            xr_u32(&r);
            break;
        case 1:
            xr_i32(&r);
            break;
        case 2: {
            char *s = xr_string(&r, ops[i] & 0x80 ? 16 : VM_STRING_MAX);
            if (!r.err)
                check_string(&r, before, s);
            else if (s)
                abort();
            free(s);
            break;
        }
        case 3: {
            int present = -1;
            char *s = xr_opt_string(&r, 4096, &present);
            if ((s && !present) || present < 0 || (s && r.err))
                abort();
            if (s)
                check_string(&r, before + 4, s);
            free(s);
            break;
        }
        case 4:
            xr_skip_string(&r);
            break;
        case 5: {
            unsigned len = 0;
            int nil = 0;
            size_t cap = ops[i] & 0x80 ? 8 : sizeof(buf);
            if (xr_nil_chars(&r, buf, cap, &len, &nil) == 0 && (len > cap || r.err))
                abort();
            break;
        }
        default: {
            /* Re-encode what the writer would make of the next word and compare. */
            uint32_t v = xr_u32(&r);
            if (!r.err) {
                struct xbuf b;
                xb_init(&b);
                xb_u32(&b, v);
                if (b.len != 4 || memcmp(b.p, r.p + before, 4) != 0)
                    abort();
                xb_free(&b);
            }
        }
        }
        if (was_err && (!r.err || r.off != before))
            abort(); /* errors are sticky and stop the reader */
        check_reader(&r);
    }
}

/* session.c handle_open: optional name (at most 4096 bytes) and flags. */
static void open_args(const uint8_t *data, size_t size)
{
    struct xrd r;
    int present;
    xr_init(&r, data, size);
    char *name = xr_opt_string(&r, 4096, &present);
    uint32_t flags = xr_u32(&r);
    check_reader(&r);
    if (r.err) {
        free(name);
        return;
    }
    /* Encode what was decoded; decoding that must give the same again. */
    struct xbuf b;
    xb_init(&b);
    xb_opt_string(&b, name);
    xb_u32(&b, flags);
    struct xrd again;
    int present2;
    xr_init(&again, b.p, b.len);
    char *name2 = xr_opt_string(&again, 4096, &present2);
    uint32_t flags2 = xr_u32(&again);
    if (again.err || again.off != b.len || present2 != present || flags2 != flags ||
        (name && strcmp(name, name2) != 0))
        abort();
    free(name2);
    xb_free(&b);

    struct vm_route route = {0};
    char err[600];
    const char *listener_up = flags & 2 ? "hv2" : NULL;
    if (router_resolve(route_cfg, listener_up, name ? name : "", &route, err, sizeof(err)) == 0) {
        if (!route.upstream || !route.name)
            abort();
        route_clear(&route);
    } else if (strlen(err) >= sizeof(err)) {
        abort();
    }
    free(name);
}

/* auth.c: AUTH_SASL_START is `string mech<100>; int nil; char data<>` into a 64 KiB buffer. */
static void sasl_start(const uint8_t *data, size_t size)
{
    static uint8_t buf[65536];
    struct xrd r;
    unsigned len = 0;
    int nil = 0;
    xr_init(&r, data, size);
    char *mech = xr_string(&r, 100);
    if (mech && xr_nil_chars(&r, buf, sizeof(buf), &len, &nil) == 0) {
        if (len > sizeof(buf) || strlen(mech) > 100)
            abort();
        /* Encoding the token again gives the bytes the wire carried, up to the byte each
         * XDR char was truncated to. */
        struct xbuf b;
        xb_init(&b);
        xb_nil_chars(&b, buf, len);
        if (b.len != 8 + 4 * (size_t)len)
            abort();
        xb_free(&b);
    }
    check_reader(&r);
    free(mech);
}

/* auth.c AUTH_SASL_STEP (token pair) and upstream.c's reading of libvirtd's reply
 * (`int complete; int nil; char data<>`). */
static void sasl_step(const uint8_t *data, size_t size)
{
    static uint8_t buf[65536];
    struct xrd r;
    unsigned len = 0;
    int nil = 0;
    xr_init(&r, data, size);
    if (xr_nil_chars(&r, buf, sizeof(buf), &len, &nil) == 0 && r.off != 8 + 4 * (size_t)len)
        abort();
    check_reader(&r);
    xr_init(&r, data, size);
    xr_i32(&r); /* complete */
    if (xr_nil_chars(&r, buf, sizeof(buf), &len, &nil) == 0 && r.off != 12 + 4 * (size_t)len)
        abort();
    check_reader(&r);
}

static void error_payload(const uint8_t *data, size_t size)
{
    int code, domain;
    char msg[1024];
    if (wire_error_decode(data, size, &code, &domain, msg, sizeof(msg)) < 0)
        return;
    struct xbuf b;
    xb_init(&b);
    wire_error_payload(&b, code, domain, msg);
    int code2, domain2;
    char msg2[1024];
    if (wire_error_decode(b.p, b.len, &code2, &domain2, msg2, sizeof(msg2)) < 0 ||
        code2 != code || domain2 != domain || strcmp(msg, msg2) != 0)
        abort();
    xb_free(&b);
}

/* policy_readonly_allows on one CALL of `prog`/`proc` with these arguments, split over two
 * chains of the packet. */
static int readonly_verdict(uint32_t prog, int32_t proc, const uint8_t *args, size_t n,
                            size_t split)
{
    struct vm_hdr h = {.len = (uint32_t)(VM_HDR_LEN + n), .prog = prog, .vers = VM_PROG_VERSION,
                       .proc = proc, .type = VM_CALL, .serial = 1, .status = VM_STATUS_OK};
    uint8_t raw[VM_HDR_LEN];
    wire_hdr_encode(&h, raw);
    struct evbuffer *pkt = evbuffer_new(), *tail = evbuffer_new();
    if (!pkt || !tail)
        abort();
    evbuffer_add(pkt, raw, sizeof(raw));
    evbuffer_add(pkt, args, split);
    evbuffer_add(tail, args + split, n - split);
    evbuffer_add_buffer(pkt, tail);
    evbuffer_free(tail);
    char msg[300] = "";
    int domain = -1;
    int ok = policy_readonly_allows(&h, pkt, msg, sizeof(msg), &domain);
    if (evbuffer_get_length(pkt) != h.len || domain < 0 ||
        (!ok && strncmp(msg, "operation forbidden: ", 21) != 0))
        abort();
    evbuffer_free(pkt);
    return ok;
}

static void readonly_sweep(const uint8_t *data, size_t size)
{
    if (size + 8 > 65536)
        return; /* the decoder refuses argument blocks above 64 KiB outright */
    size_t split = size ? data[0] % (size + 1) : 0;
    uint8_t *longer = malloc(size + 8);
    if (!longer)
        abort();
    if (size)
        memcpy(longer, data, size);
    memset(longer + size, 0xff, 8);
    for (size_t i = 0; i < vm_proc_table_len; i++) {
        const struct vm_proc_info *p = &vm_proc_table[i];
        int ok = readonly_verdict(p->prog, p->proc, data, size, split);
        int remote = p->prog == VM_PROG_REMOTE;
        if ((remote && p->ro == VM_RO_YES && !ok) || (remote && p->ro == VM_RO_NO && ok) ||
            ((p->prog == VM_PROG_QEMU || p->prog == VM_PROG_LXC) && ok))
            abort();
        if (p->ro == VM_RO_FLAGS && ok && !readonly_verdict(p->prog, p->proc, longer, size + 8,
                                                            split))
            abort();
    }
    free(longer);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    switch (data[0] % 6) {
    case 0:
        run_ops(data + 1, size - 1);
        break;
    case 1:
        open_args(data + 1, size - 1);
        break;
    case 2:
        sasl_start(data + 1, size - 1);
        break;
    case 3:
        sasl_step(data + 1, size - 1);
        break;
    case 4:
        error_payload(data + 1, size - 1);
        break;
    default:
        readonly_sweep(data + 1, size - 1);
    }
    return 0;
}
