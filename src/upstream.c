/*
 * One upstream connection to libvirtd ("link").
 *
 *   link_new --timer--> connect --> AUTH_LIST(s0) --> SUPPORTS_FEATURE 10 (s1) --> OPEN (s2)
 *                                                                                   |
 *        pool_link_down <-- socket lost / keepalive dead / refused <-- READY <------'
 *             |                                                        |  link_send: serial
 *             `--> BACKOFF (refs > 0) --timer--> connect ...           |  rewrite, inflight[]
 *                  or freed (nothing refers to it)                     `-- reply: call_finish
 *
 * Ownership: the pool lists links; a link frees itself (link_free) when it is unused, and
 * tells the pool through pool_link_gone. Sessions hold references (refs) on their home link.
 */
#include "upstream.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "auth.h"
#include "call.h"
#include "config.h"
#include "gateway.h"
#include "keepalive.h"
#include "log.h"
#include "pool.h"
#include "proc.h"
#include "stream.h"
#include "wire.h"
#include "util.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define INTERNAL_RESERVE 16 /* slots beyond max_inflight for the gateway's own calls */

/* Handshake steps, in order; SASL steps only when libvirtd asks for SASL. */
enum hs_step { HS_AUTH_LIST, HS_SASL_INIT, HS_SASL_STEP, HS_KEEPALIVE, HS_OPEN };

struct vm_link {
    struct vm_pool *pool;        /* not owned; outlives the link */
    unsigned id;
    char tag[200];
    enum vm_link_state state;
    struct bufferevent *bev;     /* owned while connected */
    struct event *timer;         /* owned: start, backoff and idle */
    int timer_is_idle;
    int backoff_ms;
    int refs;                    /* sessions whose home this is */
    int freeing;

    uint32_t next_serial;
    struct vm_call **inflight;   /* owned slots; the calls belong to their sessions */
    int max_inflight, ninflight; /* client calls */
    int nslots, ninternal;       /* max_inflight + INTERNAL_RESERVE; gateway's own calls */
    struct vm_keepalive ka;
    struct vm_stream *stream;    /* dedicated to this stream (not in the pool), or NULL */
    int dedicated;
    time_t down_since;           /* first failure since the link was last READY; 0 = up */
    int awaiting_confirm;        /* TLS: libvirtd's 0x01 byte not read yet */
    enum hs_step hs;             /* which handshake reply is expected */
    int retiring;                /* CONNECT_CLOSE sent; freed on its reply, EOF or timeout */
    struct vm_gateway *gw;       /* not owned; the pool may be gone while retiring */
    struct vm_sasl_client *sasl; /* owned during a SASL handshake */
};

static void link_connect(struct vm_link *l);
static void link_down(struct vm_link *l, const void *err_payload, size_t n, const char *why);
static void maybe_idle(struct vm_link *l);
static void read_cb(struct bufferevent *bev, void *arg);
static void write_cb(struct bufferevent *bev, void *arg);
static void event_cb(struct bufferevent *bev, short what, void *arg);

enum vm_link_state link_state(const struct vm_link *l) { return l->state; }
int link_refs(const struct vm_link *l) { return l->refs; }
int link_inflight(const struct vm_link *l) { return l->ninflight; }
const char *link_tag(const struct vm_link *l) { return l->tag; }

int link_has_room(const struct vm_link *l)
{
    return l->ninflight < l->max_inflight;
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_link *l = arg;
    if (l->retiring) {
        link_free(l); /* libvirtd did not answer CONNECT_CLOSE in time */
        return;
    }
    if (l->timer_is_idle) {
        l->timer_is_idle = 0;
        if (l->refs == 0 && l->ninflight == 0 && l->ninternal == 0) {
            vm_info(l->tag, "idle: closing");
            link_retire(l);
        }
        return;
    }
    const struct vm_upstream_cfg *up = pool_upstream(l->pool);
    if (!l->dedicated && l->down_since && up->pool.give_up_s > 0 &&
        time(NULL) - l->down_since >= up->pool.give_up_s) {
        char why[160];
        snprintf(why, sizeof(why), "upstream %s unreachable for %d s", up->name,
                 (int)(time(NULL) - l->down_since));
        l->down_since = time(NULL); /* whoever still holds it starts a new period */
        vm_warn(l->tag, "giving up: %s", why);
        gateway_link_lost(pool_gateway(l->pool), l, why);
        if (l->freeing)
            return;
    }
    link_connect(l);
}

static void arm_timer(struct vm_link *l, int ms, int idle)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    l->timer_is_idle = idle;
    evtimer_add(l->timer, &tv);
}

struct vm_link *link_new(struct vm_pool *p)
{
    struct vm_link *l = vm_calloc(1, sizeof(*l));
    const struct vm_upstream_cfg *up = pool_upstream(p);
    l->pool = p;
    l->gw = pool_gateway(p);
    l->id = gateway_next_id(pool_gateway(p));
    snprintf(l->tag, sizeof(l->tag), "U#%u %s%s", l->id, up->name, pool_readonly(p) ? " ro" : "");
    l->max_inflight = up->pool.max_inflight;
    l->nslots = l->max_inflight + INTERNAL_RESERVE;
    l->inflight = calloc((size_t)l->nslots, sizeof(*l->inflight));
    l->timer = evtimer_new(gateway_base(pool_gateway(p)), timer_cb, l);
    if (!l->inflight || !l->timer)
        abort();
    l->state = VM_LINK_CONNECTING;
    l->backoff_ms = BACKOFF_MIN_MS;
    arm_timer(l, 0, 0); /* connect from the loop, never inside the caller */
    return l;
}

struct vm_link *link_new_dedicated(struct vm_pool *p, struct vm_stream *st)
{
    struct vm_link *l = link_new(p);
    l->stream = st;
    l->dedicated = 1;
    snprintf(l->tag + strlen(l->tag), sizeof(l->tag) - strlen(l->tag), " stream");
    return l;
}

void link_detach_stream(struct vm_link *l)
{
    l->stream = NULL;
}

void link_write(struct vm_link *l, struct evbuffer *pkt)
{
    if (l->bev)
        bufferevent_write_buffer(l->bev, pkt);
    else
        evbuffer_drain(pkt, evbuffer_get_length(pkt));
}

size_t link_output_length(const struct vm_link *l)
{
    return l->bev ? evbuffer_get_length(bufferevent_get_output(l->bev)) : 0;
}

void link_pause_reading(struct vm_link *l, int pause)
{
    if (!l->bev)
        return;
    if (pause)
        bufferevent_disable(l->bev, EV_READ);
    else
        bufferevent_enable(l->bev, EV_READ);
}

static void link_free_mem(void *arg)
{
    struct vm_link *l = arg;
    free(l->inflight);
    free(l);
}

void link_free(struct vm_link *l)
{
    if (l->freeing)
        return;
    l->freeing = 1;
    if (l->retiring) {
        /* Nothing in flight, nobody to tell, and the pool may be gone already. */
        gateway_link_retired(l->gw, l);
        if (l->bev)
            bufferevent_free(l->bev);
        l->bev = NULL;
        vmsasl_client_end(l->sasl);
        l->sasl = NULL;
        vm_debug(l->tag, "closed: said goodbye with CONNECT_CLOSE");
    } else if (l->bev) {
        link_down(l, NULL, 0, "closed by virtmux");
    }
    keepalive_stop(&l->ka);
    event_free(l->timer);
    l->timer = NULL;
    if (!l->dedicated && !l->retiring)
        pool_link_gone(l->pool, l);
    gateway_defer_free(l->gw, link_free_mem, l);
}

void link_retire(struct vm_link *l)
{
    if (l->state != VM_LINK_READY || !l->bev || l->ninflight || l->ninternal) {
        link_free(l);
        return;
    }
    /* Leave the pool now (nothing may be routed here any more), then say goodbye the way a
     * libvirt client does, so libvirtd does not log a connection that simply vanished. */
    if (!l->dedicated)
        pool_link_gone(l->pool, l);
    l->retiring = 1;
    gateway_link_retiring(l->gw, l);
    l->stream = NULL;
    keepalive_stop(&l->ka);
    evtimer_del(l->timer);
    l->timer_is_idle = 0;
    wire_put_packet(bufferevent_get_output(l->bev), VM_PROG_REMOTE, VM_PROC_CONNECT_CLOSE, VM_CALL,
                    l->next_serial++, VM_STATUS_OK, NULL, 0);
    struct timeval tv = {2, 0};
    evtimer_add(l->timer, &tv);
}

void link_ref(struct vm_link *l)
{
    l->refs++;
    if (l->timer_is_idle) {
        evtimer_del(l->timer);
        l->timer_is_idle = 0;
    }
}

void link_unref(struct vm_link *l)
{
    l->refs--;
    if (l->refs == 0 && l->state == VM_LINK_BACKOFF) {
        /* Nobody is waiting for this one to come back. */
        link_free(l);
        return;
    }
    maybe_idle(l);
}

static void maybe_idle(struct vm_link *l)
{
    if (l->refs || l->ninflight || l->ninternal || l->state != VM_LINK_READY || l->freeing)
        return;
    int secs = pool_upstream(l->pool)->pool.idle_timeout_s;
    arm_timer(l, secs * 1000, 1);
}

/* ---- sending ---- */

static void send_call(struct vm_link *l, int32_t proc, const void *args, size_t n)
{
    wire_put_packet(bufferevent_get_output(l->bev), VM_PROG_REMOTE, proc, VM_CALL,
                    l->next_serial++, VM_STATUS_OK, args, n);
}

static void put_inflight(struct vm_link *l, struct vm_call *c)
{
    int slot = 0;
    while (l->inflight[slot])
        slot++;
    l->inflight[slot] = c;
    if (c->done)
        l->ninternal++;
    else
        l->ninflight++;
}

int link_send_internal(struct vm_link *l, uint32_t prog, int32_t proc, const void *args,
                       size_t n, vm_call_done_fn done, void *arg)
{
    if (l->state != VM_LINK_READY || l->ninflight + l->ninternal >= l->nslots)
        return -1;
    struct vm_call *c = vm_calloc(1, sizeof(*c));
    c->done = done;
    c->done_arg = arg;
    c->pkt = evbuffer_new();
    if (!c->pkt)
        abort();
    wire_put_packet(c->pkt, prog, proc, VM_CALL, 0, VM_STATUS_OK, args, n);
    c->hdr.prog = prog;
    c->hdr.proc = proc;
    link_send(l, c);
    return 0;
}

void link_send(struct vm_link *l, struct vm_call *c)
{
    put_inflight(l, c);
    c->link = l;
    c->up_serial = l->next_serial++;
    wire_set_serial(c->pkt, c->up_serial);
    bufferevent_write_buffer(l->bev, c->pkt);
    evbuffer_free(c->pkt);
    c->pkt = NULL;
    if (l->timer_is_idle) {
        evtimer_del(l->timer);
        l->timer_is_idle = 0;
    }
}

static void clear_slot(struct vm_link *l, int i)
{
    struct vm_call *c = l->inflight[i];
    l->inflight[i] = NULL;
    if (c->done)
        l->ninternal--;
    else
        l->ninflight--;
    c->link = NULL;
}

static struct vm_call *take_inflight(struct vm_link *l, uint32_t serial)
{
    for (int i = 0; i < l->nslots; i++) {
        struct vm_call *c = l->inflight[i];
        if (c && c->up_serial == serial) {
            clear_slot(l, i);
            return c;
        }
    }
    return NULL;
}

/* ---- keepalive ---- */

static void ka_ping(void *arg)
{
    struct vm_link *l = arg;
    if (l->bev)
        wire_put_keepalive(bufferevent_get_output(l->bev), VM_PROC_KEEPALIVE_PING);
}

static void ka_dead(void *arg)
{
    link_down(arg, NULL, 0, "keepalive timeout: libvirtd stopped answering");
}

/* ---- handshake ---- */

static void send_feature_keepalive(struct vm_link *l)
{
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, VM_FEATURE_PROGRAM_KEEPALIVE);
    l->hs = HS_KEEPALIVE;
    send_call(l, VM_PROC_CONNECT_SUPPORTS_FEATURE, b.p, b.len);
    xb_free(&b);
}

/* Send AUTH_SASL_START (mech != NULL) or AUTH_SASL_STEP with a token (4 bytes per char). */
static void send_sasl(struct vm_link *l, const char *mech, const char *data, unsigned len)
{
    struct xbuf b;
    xb_init(&b);
    if (mech)
        xb_string(&b, mech);
    xb_nil_chars(&b, data, len);
    l->hs = HS_SASL_STEP;
    send_call(l, mech ? 68 : 69, b.p, b.len);
    xb_free(&b);
}

static int sasl_secure(const struct vm_link *l)
{
    return pool_upstream(l->pool)->uri.transport != VM_TR_TCP;
}

/* One SASL handshake reply (INIT's mechlist, or START/STEP's token). 0, or -1 when down. */
static int sasl_reply(struct vm_link *l, const uint8_t *payload, size_t n)
{
    char err[300];
    struct xrd r;
    xr_init(&r, payload, n);
    const char *out = NULL;
    unsigned outlen = 0;
    if (l->hs == HS_SASL_INIT) {
        char *mechs = xr_string(&r, 4096);
        const char *mech = NULL;
        if (!mechs || vmsasl_client_first(l->sasl, mechs, &mech, &out, &outlen, err,
                                          sizeof(err)) < 0) {
            free(mechs);
            link_down(l, NULL, 0, mechs ? err : "bad SASL mechanism list");
            return -1;
        }
        vm_debug(l->tag, "SASL to libvirtd with %s (offered %s)", mech, mechs);
        free(mechs);
        send_sasl(l, mech, out, outlen);
        return 0;
    }
    int complete = xr_i32(&r);
    int nil;
    unsigned len;
    static char data[65536];
    if (xr_nil_chars(&r, data, sizeof(data), &len, &nil) < 0) {
        link_down(l, NULL, 0, "bad SASL reply from libvirtd");
        return -1;
    }
    if (!complete || !vmsasl_client_done(l->sasl)) {
        /* Answer the token; after complete=1 this is the local mutual-auth step only. */
        if ((!complete || !nil) &&
            vmsasl_client_next(l->sasl, nil ? NULL : data, len, &out, &outlen, err,
                               sizeof(err)) < 0) {
            link_down(l, NULL, 0, err);
            return -1;
        }
        if (!complete) {
            send_sasl(l, NULL, out, outlen);
            return 0;
        }
    }
    int layer = vmsasl_client_layer(l->sasl, sasl_secure(l), err, sizeof(err));
    if (layer < 0) {
        link_down(l, NULL, 0, err);
        return -1;
    }
    vm_info(l->tag, "authenticated to libvirtd as SASL user %s%s", pool_upstream(l->pool)->sasl_user,
            layer > 0 ? " (security layer on)" : "");
    if (layer > 0) {
        struct bufferevent *f = vmsasl_client_wrap(l->sasl, l->bev);
        if (!f) {
            link_down(l, NULL, 0, "cannot start the SASL security layer");
            return -1;
        }
        l->bev = f;
        bufferevent_setcb(l->bev, read_cb, l->dedicated ? write_cb : NULL, event_cb, l);
        bufferevent_enable(l->bev, EV_READ | EV_WRITE);
    }
    send_feature_keepalive(l);
    return 0;
}

static void handshake_reply(struct vm_link *l, const struct vm_hdr *h, struct evbuffer *pkt)
{
    size_t n = h->len - VM_HDR_LEN;
    uint8_t *payload = evbuffer_pullup(pkt, -1) + VM_HDR_LEN;
    if (h->status != VM_STATUS_OK) {
        int code, dom;
        char msg[512];
        if (wire_error_decode(payload, n, &code, &dom, msg, sizeof(msg)) < 0)
            snprintf(msg, sizeof(msg), "undecodable error");
        char why[600];
        snprintf(why, sizeof(why), "libvirtd refused the %s: %s",
                 l->hs == HS_OPEN ? "open" : l->hs == HS_AUTH_LIST ? "handshake" : "gateway's SASL login",
                 msg);
        /* Only libvirtd's refusal of the name is the client's business; a refused SASL login
         * of the gateway is ours, and must not read as the client's own auth failure. */
        link_down(l, l->hs == HS_OPEN ? payload : NULL, n, why);
        return;
    }
    const struct vm_upstream_cfg *up = pool_upstream(l->pool);
    if (h->serial != l->next_serial - 1) {
        vm_debug(l->tag, "unexpected handshake reply serial %u", h->serial);
        return;
    }
    switch (l->hs) {
    case HS_AUTH_LIST: {
        struct xrd r;
        xr_init(&r, payload, n);
        uint32_t count = xr_u32(&r);
        int none = count == 0, sasl = 0; /* an empty list also means no auth */
        for (uint32_t i = 0; i < count && i < 8 && !r.err; i++) {
            uint32_t t = xr_u32(&r);
            none |= t == 0;
            sasl |= t == 1;
        }
        if (!r.err && !none && sasl && up->sasl_user) {
            char err[300];
            SSL *ssl = up->uri.transport == VM_TR_TLS ? bufferevent_openssl_get_ssl(l->bev) : NULL;
            l->sasl = vmsasl_client_begin(up->sasl_user, up->sasl_password_file,
                                          up->uri.host ? up->uri.host : "localhost",
                                          sasl_secure(l), ssl ? SSL_get_cipher_bits(ssl, NULL) : 0,
                                          err, sizeof(err));
            if (!l->sasl) {
                link_down(l, NULL, 0, err);
                return;
            }
            l->hs = HS_SASL_INIT;
            send_call(l, 67, NULL, 0);
            return;
        }
        if (r.err || !none) {
            link_down(l, NULL, 0, sasl ? "libvirtd requires SASL: configure upstreams[].sasl"
                                       : "libvirtd requires an authentication virtmux does not "
                                         "speak (polkit)");
            return;
        }
        send_feature_keepalive(l);
        return;
    }
    case HS_SASL_INIT:
    case HS_SASL_STEP:
        sasl_reply(l, payload, n);
        return;
    case HS_KEEPALIVE: {
        struct xbuf b;
        xb_init(&b);
        xb_opt_string(&b, pool_name(l->pool));
        xb_u32(&b, pool_readonly(l->pool) ? 1 : 0);
        l->hs = HS_OPEN;
        send_call(l, VM_PROC_CONNECT_OPEN, b.p, b.len);
        xb_free(&b);
        return;
    }
    case HS_OPEN: {
        l->state = VM_LINK_READY;
        l->backoff_ms = BACKOFF_MIN_MS;
        l->down_since = 0;
        bufferevent_set_timeouts(l->bev, NULL, NULL);
        const struct vm_config *cfg = gateway_config(pool_gateway(l->pool));
        if (keepalive_start(&l->ka, gateway_base(pool_gateway(l->pool)), cfg->keepalive_interval_s,
                            cfg->keepalive_count, ka_ping, ka_dead, l) < 0)
            vm_warn(l->tag, "cannot arm keepalive");
        vm_info(l->tag, "ready: opened \"%s\"%s", pool_name(l->pool),
                pool_readonly(l->pool) ? " read-only" : "");
        (void)up;
        if (l->dedicated) {
            bufferevent_setwatermark(l->bev, EV_WRITE, 256u << 10, 0);
            if (l->stream)
                stream_link_ready(l->stream);
            return;
        }
        pool_link_ready(l->pool, l);
        maybe_idle(l);
        return;
    }
    default:
        vm_debug(l->tag, "unexpected handshake reply serial %u", h->serial);
    }
}

/* ---- reading ---- */

/* Returns 0 to keep reading, -1 when the link went down. */
static int handle_packet(struct vm_link *l, struct evbuffer *pkt)
{
    struct vm_hdr h;
    wire_hdr_peek(pkt, &h);
    if (l->retiring) {
        if (h.type == VM_REPLY) {
            link_free(l); /* CONNECT_CLOSE answered */
            return -1;
        }
        return 0;
    }
    keepalive_touch(&l->ka);
    if (h.prog == VM_PROG_KEEPALIVE) {
        if (h.proc == VM_PROC_KEEPALIVE_PING)
            wire_put_keepalive(bufferevent_get_output(l->bev), VM_PROC_KEEPALIVE_PONG);
        return 0;
    }
    if (l->state == VM_LINK_HANDSHAKE && (h.type == VM_REPLY || h.type == VM_REPLY_WITH_FDS)) {
        handshake_reply(l, &h, pkt);
        return l->bev ? 0 : -1;
    }
    if (l->dedicated) {
        if (l->stream)
            stream_from_upstream(l->stream, &h, pkt);
        return l->bev ? 0 : -1;
    }
    if (h.type == VM_REPLY || h.type == VM_REPLY_WITH_FDS) {
        struct vm_call *c = take_inflight(l, h.serial);
        if (!c) {
            vm_warn(l->tag, "reply for unknown serial %u (proc %d) dropped", h.serial, h.proc);
            return 0;
        }
        struct evbuffer *moved = evbuffer_new();
        if (!moved)
            abort();
        evbuffer_add_buffer(moved, pkt);
        call_finish(c, moved);
        pool_link_slot_free(l->pool, l);
        maybe_idle(l);
        return 0;
    }
    if (h.type == VM_MESSAGE) {
        pool_link_event(l->pool, l, &h, pkt);
        return l->bev ? 0 : -1;
    }
    vm_debug(l->tag, "dropped packet type %u proc %d", h.type, h.proc);
    return 0;
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    struct vm_link *l = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    if (l->awaiting_confirm) {
        uint8_t b;
        if (evbuffer_remove(in, &b, 1) != 1)
            return;
        if (b != 1) {
            link_down(l, NULL, 0, "libvirtd did not confirm the TLS session");
            return;
        }
        l->awaiting_confirm = 0;
        l->hs = HS_AUTH_LIST;
        send_call(l, VM_PROC_AUTH_LIST, NULL, 0);
    }
    for (;;) {
        uint32_t len;
        int r = wire_frame_ready(in, &len);
        if (r < 0) {
            if (l->retiring)
                link_free(l);
            else
                link_down(l, NULL, 0, "libvirtd sent an illegal length word");
            return;
        }
        if (r == 0)
            return;
        struct evbuffer *pkt = evbuffer_new();
        if (!pkt)
            abort();
        evbuffer_remove_buffer(in, pkt, len);
        int rc = handle_packet(l, pkt);
        evbuffer_free(pkt);
        if (rc < 0 || !l->bev)
            return;
    }
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    struct vm_link *l = arg;
    if (l->stream)
        stream_link_drained(l->stream);
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct vm_link *l = arg;
    if (l->retiring) {
        link_free(l);
        return;
    }
    if (what & BEV_EVENT_CONNECTED) {
        evutil_socket_t fd = bufferevent_getfd(bev);
        int one = 1;
        if (pool_upstream(l->pool)->uri.transport != VM_TR_UNIX)
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        l->state = VM_LINK_HANDSHAKE;
        l->next_serial = HS_AUTH_LIST;
        const struct vm_upstream_cfg *up = pool_upstream(l->pool);
        if (up->uri.transport == VM_TR_TLS) {
            SSL *ssl = bufferevent_openssl_get_ssl(bev);
            long vr = SSL_get_verify_result(ssl);
            if (!up->tls->no_verify && vr != X509_V_OK) {
                char why[300];
                snprintf(why, sizeof(why), "libvirtd's certificate: %s",
                         X509_verify_cert_error_string(vr));
                link_down(l, NULL, 0, why);
                return;
            }
            l->awaiting_confirm = 1; /* libvirtd checks our certificate, then sends 0x01 */
            return;
        }
        l->hs = HS_AUTH_LIST;
        send_call(l, VM_PROC_AUTH_LIST, NULL, 0);
        return;
    }
    char why[300];
    if (what & BEV_EVENT_TIMEOUT)
        snprintf(why, sizeof(why), "%s timed out",
                 l->state == VM_LINK_CONNECTING ? "connect" : "handshake");
    else if (l->awaiting_confirm)
        snprintf(why, sizeof(why), "libvirtd refused the gateway's TLS certificate");
    else if (what & BEV_EVENT_EOF)
        snprintf(why, sizeof(why), "libvirtd closed the connection");
    else if (pool_upstream(l->pool)->uri.transport == VM_TR_TLS &&
             bufferevent_get_openssl_error(bev)) {
        char e[200];
        ERR_error_string_n(bufferevent_get_openssl_error(bev), e, sizeof(e));
        long vr = SSL_get_verify_result(bufferevent_openssl_get_ssl(bev));
        snprintf(why, sizeof(why), "TLS handshake failed: %s%s%s", e,
                 vr != X509_V_OK ? ": " : "", vr != X509_V_OK ? X509_verify_cert_error_string(vr) : "");
    }
    else
        snprintf(why, sizeof(why), "%s", evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
    link_down(l, NULL, 0, why);
}

static int make_addr(const struct vm_uri *u, struct sockaddr_storage *ss, socklen_t *len,
                     char *err, size_t errlen)
{
    memset(ss, 0, sizeof(*ss));
    if (u->transport == VM_TR_UNIX) {
        struct sockaddr_un *sun = (struct sockaddr_un *)ss;
        sun->sun_family = AF_UNIX;
        if (strlen(u->socket) >= sizeof(sun->sun_path)) {
            snprintf(err, errlen, "socket path too long");
            return -1;
        }
        strcpy(sun->sun_path, u->socket);
        *len = sizeof(*sun);
        return 0;
    }
    /* Blocking resolution: upstreams are configured by address or /etc/hosts names. */
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res;
    char port[16];
    snprintf(port, sizeof(port), "%d", u->port);
    int rc = getaddrinfo(u->host, port, &hints, &res);
    if (rc) {
        snprintf(err, errlen, "cannot resolve %s: %s", u->host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static void link_connect(struct vm_link *l)
{
    const struct vm_upstream_cfg *up = pool_upstream(l->pool);
    struct sockaddr_storage ss;
    socklen_t sslen;
    char err[300];
    l->state = VM_LINK_CONNECTING;
    if (make_addr(&up->uri, &ss, &sslen, err, sizeof(err)) < 0) {
        link_down(l, NULL, 0, err);
        return;
    }
    l->awaiting_confirm = 0;
    if (up->uri.transport == VM_TR_TLS) {
        SSL *ssl = SSL_new(gateway_upstream_tls(pool_gateway(l->pool), up));
        if (!ssl)
            abort();
        const char *name = up->tls->server_name ? up->tls->server_name : up->uri.host;
        if (!up->tls->no_verify) {
            X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
            if (X509_VERIFY_PARAM_set1_ip_asc(vp, name) != 1)
                X509_VERIFY_PARAM_set1_host(vp, name, 0);
        }
        /* No SNI, like libvirt's own client. */
        l->bev = bufferevent_openssl_socket_new(gateway_base(pool_gateway(l->pool)), -1, ssl,
                                                BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE);
    } else {
        l->bev = bufferevent_socket_new(gateway_base(pool_gateway(l->pool)), -1,
                                        BEV_OPT_CLOSE_ON_FREE);
    }
    if (!l->bev)
        abort();
    bufferevent_setcb(l->bev, read_cb, l->dedicated ? write_cb : NULL, event_cb, l);
    int ms = up->pool.connect_timeout_ms;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    bufferevent_set_timeouts(l->bev, &tv, &tv);
    bufferevent_enable(l->bev, EV_READ | EV_WRITE);
    vm_debug(l->tag, "connecting to %s", up->uri_text);
    if (bufferevent_socket_connect(l->bev, (struct sockaddr *)&ss, (int)sslen) < 0) {
        link_down(l, NULL, 0, strerror(errno));
        return;
    }
}

void link_reconnect_now(struct vm_link *l)
{
    if (l->state != VM_LINK_BACKOFF)
        return;
    evtimer_del(l->timer);
    l->state = VM_LINK_CONNECTING;
    arm_timer(l, 0, 0);
}

/* The socket is gone (or never came): fail what is in flight, then back off or disappear. */
static void link_down(struct vm_link *l, const void *err_payload, size_t n, const char *why)
{
    int was_ready = l->state == VM_LINK_READY;
    keepalive_stop(&l->ka);
    if (l->bev) {
        bufferevent_free(l->bev);
        l->bev = NULL;
    }
    vmsasl_client_end(l->sasl); /* after the bufferevent: its filter used the connection */
    l->sasl = NULL;
    if (l->freeing)
        vm_debug(l->tag, "closed: %s", why);
    else if (was_ready || l->ninflight)
        vm_warn(l->tag, "connection lost: %s (%d calls in flight)", why, l->ninflight);
    else
        vm_info(l->tag, "cannot connect: %s", why);

    char msg[600];
    snprintf(msg, sizeof(msg), "internal error: virtmux lost its connection to upstream %s: %s",
             pool_upstream(l->pool)->name, why);
    for (int i = 0; i < l->nslots; i++) {
        struct vm_call *c = l->inflight[i];
        if (!c)
            continue;
        clear_slot(l, i);
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
    }

    l->state = VM_LINK_BACKOFF;
    if (!l->down_since)
        l->down_since = time(NULL);
    if (l->dedicated) {
        struct vm_stream *st = l->stream;
        l->stream = NULL;
        if (st)
            stream_link_down(st, why);
        if (!l->freeing)
            link_free(l);
        return;
    }
    if (l->timer_is_idle) {
        evtimer_del(l->timer);
        l->timer_is_idle = 0;
    }
    if (!l->freeing && l->refs > 0) {
        vm_info(l->tag, "reconnecting in %d ms", l->backoff_ms);
        arm_timer(l, l->backoff_ms, 0);
        l->backoff_ms = l->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : l->backoff_ms * 2;
    }
    if (!l->freeing)
        pool_link_down(l->pool, l, err_payload, n, why);
    if (!l->freeing && l->refs == 0)
        link_free(l);
}
