#include "wire.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "proc.h"

int wire_len_ok(uint32_t len)
{
    return len >= VM_HDR_LEN && len <= VM_LEN_MAX;
}

int wire_frame_ready(struct evbuffer *in, uint32_t *len)
{
    uint8_t w[4];
    if (evbuffer_get_length(in) < 4)
        return 0;
    evbuffer_copyout(in, w, 4);
    uint32_t n = (uint32_t)w[0] << 24 | (uint32_t)w[1] << 16 | (uint32_t)w[2] << 8 | w[3];
    if (!wire_len_ok(n))
        return -1;
    *len = n;
    return evbuffer_get_length(in) >= n ? 1 : 0;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

void wire_hdr_decode(const uint8_t raw[VM_HDR_LEN], struct vm_hdr *h)
{
    h->len = get32(raw);
    h->prog = get32(raw + 4);
    h->vers = get32(raw + 8);
    h->proc = (int32_t)get32(raw + 12);
    h->type = get32(raw + 16);
    h->serial = get32(raw + 20);
    h->status = get32(raw + 24);
}

void wire_hdr_encode(const struct vm_hdr *h, uint8_t raw[VM_HDR_LEN])
{
    put32(raw, h->len);
    put32(raw + 4, h->prog);
    put32(raw + 8, h->vers);
    put32(raw + 12, (uint32_t)h->proc);
    put32(raw + 16, h->type);
    put32(raw + 20, h->serial);
    put32(raw + 24, h->status);
}

void wire_hdr_peek(struct evbuffer *pkt, struct vm_hdr *h)
{
    uint8_t raw[VM_HDR_LEN];
    evbuffer_copyout(pkt, raw, sizeof(raw));
    wire_hdr_decode(raw, h);
}

void wire_set_serial(struct evbuffer *pkt, uint32_t serial)
{
    /* The header almost always sits in the first chain already; pullup is then free. */
    uint8_t *p = evbuffer_pullup(pkt, VM_HDR_LEN);
    if (p)
        put32(p + 20, serial);
}

/* ---- XDR writer ---- */

void xb_init(struct xbuf *b)
{
    memset(b, 0, sizeof(*b));
}

void xb_free(struct xbuf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

static void xb_reserve(struct xbuf *b, size_t n)
{
    if (b->len + n <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + n)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        abort();
    b->p = p;
    b->cap = cap;
}

void xb_u32(struct xbuf *b, uint32_t v)
{
    xb_reserve(b, 4);
    put32(b->p + b->len, v);
    b->len += 4;
}

void xb_i32(struct xbuf *b, int32_t v)
{
    xb_u32(b, (uint32_t)v);
}

void xb_bytes(struct xbuf *b, const void *data, size_t n)
{
    size_t pad = (4 - (n & 3)) & 3;
    xb_reserve(b, n + pad);
    if (n)
        memcpy(b->p + b->len, data, n);
    memset(b->p + b->len + n, 0, pad);
    b->len += n + pad;
}

void xb_string(struct xbuf *b, const char *s)
{
    size_t n = strlen(s);
    xb_u32(b, (uint32_t)n);
    xb_bytes(b, s, n);
}

void xb_opt_string(struct xbuf *b, const char *s)
{
    xb_u32(b, s ? 1 : 0);
    if (s)
        xb_string(b, s);
}

void xb_nil_chars(struct xbuf *b, const void *data, unsigned len)
{
    const unsigned char *p = data;
    xb_i32(b, data ? 0 : 1);
    xb_u32(b, data ? len : 0);
    for (unsigned i = 0; data && i < len; i++)
        xb_u32(b, p[i]);
}

/* ---- XDR reader ---- */

void xr_init(struct xrd *r, const void *p, size_t len)
{
    r->p = p;
    r->len = len;
    r->off = 0;
    r->err = 0;
}

uint32_t xr_u32(struct xrd *r)
{
    if (r->err || r->len - r->off < 4) {
        r->err = 1;
        return 0;
    }
    uint32_t v = get32(r->p + r->off);
    r->off += 4;
    return v;
}

int32_t xr_i32(struct xrd *r)
{
    return (int32_t)xr_u32(r);
}

char *xr_string(struct xrd *r, size_t max)
{
    uint32_t n = xr_u32(r);
    if (r->err)
        return NULL;
    size_t padded = ((size_t)n + 3) & ~(size_t)3;
    if (n > max || r->len - r->off < padded || memchr(r->p + r->off, 0, n)) {
        r->err = 1;
        return NULL;
    }
    char *s = malloc((size_t)n + 1);
    if (!s)
        abort();
    memcpy(s, r->p + r->off, n);
    s[n] = '\0';
    r->off += padded;
    return s;
}

void xr_skip_string(struct xrd *r)
{
    uint32_t n = xr_u32(r);
    size_t padded = ((size_t)n + 3) & ~(size_t)3;
    if (r->err || n > VM_STRING_MAX || r->len - r->off < padded)
        r->err = 1;
    else
        r->off += padded;
}

int xr_nil_chars(struct xrd *r, void *buf, size_t cap, unsigned *len, int *nil)
{
    unsigned char *p = buf;
    *nil = xr_i32(r);
    uint32_t n = xr_u32(r);
    if (r->err || n > cap) {
        r->err = 1;
        return -1;
    }
    for (uint32_t i = 0; i < n; i++)
        p[i] = (unsigned char)xr_u32(r);
    *len = n;
    return r->err ? -1 : 0;
}

char *xr_opt_string(struct xrd *r, size_t max, int *present)
{
    uint32_t flag = xr_u32(r);
    *present = 0;
    if (r->err)
        return NULL;
    if (flag > 1) {
        r->err = 1;
        return NULL;
    }
    if (!flag)
        return NULL;
    *present = 1;
    return xr_string(r, max);
}

/* ---- packets ---- */

void wire_put_packet(struct evbuffer *out, uint32_t prog, int32_t proc, uint32_t type,
                     uint32_t serial, uint32_t status, const void *payload, size_t n)
{
    struct vm_hdr h = {
        .len = (uint32_t)(VM_HDR_LEN + n),
        .prog = prog,
        .vers = VM_PROG_VERSION,
        .proc = proc,
        .type = type,
        .serial = serial,
        .status = status,
    };
    uint8_t raw[VM_HDR_LEN];
    wire_hdr_encode(&h, raw);
    evbuffer_add(out, raw, sizeof(raw));
    if (n)
        evbuffer_add(out, payload, n);
}

void wire_put_reply(struct evbuffer *out, const struct vm_hdr *call, const void *payload, size_t n)
{
    wire_put_packet(out, call->prog, call->proc, VM_REPLY, call->serial, VM_STATUS_OK, payload, n);
}

static void error_payload(struct xbuf *b, int code, int domain, const char *message,
                          const char *str1, const char *str2)
{
    xb_i32(b, code);
    xb_i32(b, domain);
    xb_opt_string(b, message);
    xb_i32(b, 2); /* level: VIR_ERR_ERROR */
    xb_u32(b, 0); /* dom: absent */
    xb_opt_string(b, str1);
    xb_opt_string(b, str2);
    xb_u32(b, 0); /* str3 */
    xb_i32(b, 0); /* int1 */
    xb_i32(b, 0); /* int2 */
    xb_u32(b, 0); /* net: absent */
}

void wire_error_payload(struct xbuf *b, int code, int domain, const char *message)
{
    error_payload(b, code, domain, message, NULL, NULL);
}

void wire_put_error_full(struct evbuffer *out, const struct vm_hdr *call, int code, int domain,
                         const char *message, const char *str1, const char *str2)
{
    struct xbuf b;
    xb_init(&b);
    error_payload(&b, code, domain, message, str1, str2);
    wire_put_packet(out, call->prog, call->proc, VM_REPLY, call->serial, VM_STATUS_ERROR, b.p,
                    b.len);
    xb_free(&b);
}

void wire_put_error(struct evbuffer *out, const struct vm_hdr *call, int code, int domain,
                    const char *message)
{
    struct xbuf b;
    xb_init(&b);
    wire_error_payload(&b, code, domain, message);
    wire_put_packet(out, call->prog, call->proc, VM_REPLY, call->serial, VM_STATUS_ERROR, b.p,
                    b.len);
    xb_free(&b);
}

void wire_put_keepalive(struct evbuffer *out, int proc)
{
    wire_put_packet(out, VM_PROG_KEEPALIVE, proc, VM_MESSAGE, 0, VM_STATUS_OK, NULL, 0);
}

int wire_error_decode(const void *payload, size_t n, int *code, int *domain, char *buf,
                      size_t buflen)
{
    struct xrd r;
    int present;
    xr_init(&r, payload, n);
    *code = xr_i32(&r);
    *domain = xr_i32(&r);
    char *msg = xr_opt_string(&r, VM_STRING_MAX, &present);
    if (buflen)
        snprintf(buf, buflen, "%s", msg ? msg : "");
    free(msg);
    return r.err ? -1 : 0;
}
