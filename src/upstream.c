/*
 * One upstream connection to libvirtd ("link").
 *
 *   link_new --timer--> connect --> AUTH_LIST(s0) --> SUPPORTS_FEATURE 10 (s1) --> OPEN (s2)
 *                                                                                   |
 *       ops->down <-- socket lost / keepalive dead / refused <-- READY <------'
 *             |                                                        |  link_send: serial
 *             `--> BACKOFF (refs > 0) --timer--> connect ...           |  rewrite, inflight[]
 *                  or freed (nothing refers to it)                     `-- reply: call_finish
 *
 * Ownership: the owner (a pool, or a stream for a dedicated link) lists links; a link frees
 * itself (link_free) when it is unused and tells its owner through ops->gone. The link knows
 * its owner only as the ops table it was given. Sessions hold references (refs) on their home
 * link.
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
#include "conn.h"
#include "keepalive.h"
#include "log.h"
#include "metrics.h"
#include "proc.h"
#include "reap.h"
#include "wire.h"
#include "util.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define INTERNAL_RESERVE 16 /* slots beyond max_inflight for the gateway's own calls */
#define SLOT_BITS 11        /* max_inflight (1024) + INTERNAL_RESERVE < 2^11 */

/* Handshake steps, in order; SASL steps only when libvirtd asks for SASL. */
enum hs_step { HS_AUTH_LIST, HS_SASL_INIT, HS_SASL_STEP, HS_KEEPALIVE, HS_OPEN };

struct vm_link {
    const struct vm_link_ops *ops;
    void *owner;                 /* not owned; NULL once the link left it */
    struct vm_link_params p;     /* name: owned copy */
    const struct vm_upstream_cfg *up; /* = p.up */
    unsigned id;
    char tag[200];
    enum vm_link_state state;
    struct vm_conn *conn;        /* owned while connected */
    struct event *timer;         /* owned: start, backoff and idle */
    int timer_is_idle;
    int backoff_ms;
    int refs;                    /* sessions whose home this is */

    uint32_t next_serial;
    struct vm_call **inflight;   /* owned slots; the calls belong to their sessions */
    int max_inflight, ninflight; /* client calls */
    int nslots, ninternal;       /* max_inflight + INTERNAL_RESERVE; gateway's own calls */
    int *free_slots, nfree;      /* owned: stack of free slot indices */
    uint32_t seq;                /* upstream serial = seq << SLOT_BITS | slot (see link_send) */
    struct vm_call_list waiting; /* owned: the gateway's own calls waiting for a free slot */
    int nwaiting;
    struct vm_keepalive ka;
    int dedicated;
    int draining;                /* its upstream drains: close as soon as it is unused */
    time_t down_since;           /* first failure since the link was last READY; 0 = up */
    int awaiting_confirm;        /* TLS: libvirtd's 0x01 byte not read yet */
    enum hs_step hs;             /* which handshake reply is expected */
    struct vm_sasl_client *sasl; /* owned during a SASL handshake */
    TAILQ_ENTRY(vm_link) rentry; /* in p.retiring while RETIRING */
};

static void link_connect(struct vm_link *l);
static void link_down(struct vm_link *l, const void *err_payload, size_t n, const char *why);
static void maybe_idle(struct vm_link *l);
static const struct vm_conn_ops link_conn_ops;

enum vm_link_state link_state(const struct vm_link *l) { return l->state; }
int link_refs(const struct vm_link *l) { return l->refs; }
int link_inflight(const struct vm_link *l) { return l->ninflight; }
int link_internal(const struct vm_link *l) { return l->ninternal; }
const char *link_tag(const struct vm_link *l) { return l->tag; }

/* Client calls may use max_inflight slots; the gateway's own calls may use the reserve too.
 * Both kinds share one table of nslots, so every sender checks the total. */
static int slot_free(const struct vm_link *l)
{
    return l->ninflight + l->ninternal < l->nslots;
}

int link_has_room(const struct vm_link *l)
{
    return l->ninflight < l->max_inflight && slot_free(l);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_link *l = arg;
    if (l->state == VM_LINK_RETIRING) {
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
    const struct vm_upstream_cfg *up = l->up;
    if (!l->dedicated && l->down_since && up->pool.give_up_s > 0 &&
        time(NULL) - l->down_since >= up->pool.give_up_s) {
        char why[160];
        snprintf(why, sizeof(why), "upstream %s unreachable for %d s", up->name,
                 (int)(time(NULL) - l->down_since));
        l->down_since = time(NULL); /* whoever still holds it starts a new period */
        vm_warn(l->tag, "giving up: %s", why);
        if (l->owner && l->ops->lost_for_good)
            l->ops->lost_for_good(l->owner, l, why);
        if (l->state == VM_LINK_CLOSED)
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

struct vm_link *link_new(const struct vm_link_params *p, const struct vm_link_ops *ops,
                         void *owner)
{
    struct vm_link *l = vm_calloc(1, sizeof(*l));
    l->ops = ops;
    l->owner = owner;
    l->p = *p;
    l->p.name = vm_strdup(p->name);
    l->up = p->up;
    l->id = p->id;
    l->dedicated = p->dedicated;
    snprintf(l->tag, sizeof(l->tag), "U#%u %s%s%s", l->id, l->up->name, p->readonly ? " ro" : "",
             p->dedicated ? " stream" : "");
    l->max_inflight = l->up->pool.max_inflight;
    l->nslots = l->max_inflight + INTERNAL_RESERVE;
    l->inflight = calloc((size_t)l->nslots, sizeof(*l->inflight));
    l->free_slots = calloc((size_t)l->nslots, sizeof(*l->free_slots));
    if (!l->free_slots)
        abort();
    for (int i = l->nslots - 1; i >= 0; i--)
        l->free_slots[l->nfree++] = i;
    l->timer = evtimer_new(p->base, timer_cb, l);
    if (!l->inflight || !l->timer)
        abort();
    TAILQ_INIT(&l->waiting);
    l->state = VM_LINK_CONNECTING;
    l->backoff_ms = BACKOFF_MIN_MS;
    arm_timer(l, 0, 0); /* connect from the loop, never inside the caller */
    return l;
}

void link_free_retiring(struct vm_link_list *list)
{
    struct vm_link *l;
    while ((l = TAILQ_FIRST(list)))
        link_free(l); /* leaves the list */
}

void link_detach(struct vm_link *l)
{
    l->owner = NULL;
}

/* The link leaves its owner for good: tell it once, then never call it again. */
static void leave_owner(struct vm_link *l)
{
    void *owner = l->owner;
    l->owner = NULL;
    if (owner && l->ops->gone)
        l->ops->gone(owner, l);
}

void link_write(struct vm_link *l, struct evbuffer *pkt)
{
    if (l->conn)
        evbuffer_add_buffer(conn_output(l->conn), pkt);
    else
        evbuffer_drain(pkt, evbuffer_get_length(pkt));
}

size_t link_output_length(const struct vm_link *l)
{
    return l->conn ? conn_output_length(l->conn) : 0;
}

void link_pause_reading(struct vm_link *l, int pause)
{
    if (l->conn)
        conn_pause(l->conn, pause);
}

static void link_free_mem(void *arg)
{
    struct vm_link *l = arg;
    free(l->inflight);
    free(l->free_slots);
    free((char *)l->p.name);
    free(l);
}

int link_list_uses(const struct vm_link_list *list, const struct vm_upstream_cfg *up)
{
    const struct vm_link *l;
    TAILQ_FOREACH(l, list, rentry)
        if (l->up == up)
            return 1;
    return 0;
}

void link_free(struct vm_link *l)
{
    if (l->state == VM_LINK_CLOSED)
        return;
    int was_retiring = l->state == VM_LINK_RETIRING;
    l->state = VM_LINK_CLOSED;
    if (was_retiring) {
        /* Nothing in flight, nobody to tell, and the pool may be gone already. */
        TAILQ_REMOVE(l->p.retiring, l, rentry);
        conn_free(l->conn);
        l->conn = NULL;
        vmsasl_client_end(l->sasl);
        l->sasl = NULL;
        vm_debug(l->tag, "closed: said goodbye with CONNECT_CLOSE");
    } else if (l->conn) {
        link_down(l, NULL, 0, "closed by virtmux");
    }
    keepalive_stop(&l->ka);
    event_free(l->timer);
    l->timer = NULL;
    leave_owner(l);
    reaper_defer(l->p.reaper, link_free_mem, l);
}

void link_retire(struct vm_link *l)
{
    if (l->state != VM_LINK_READY || !l->conn || l->ninflight || l->ninternal) {
        link_free(l);
        return;
    }
    /* Leave the pool now (nothing may be routed here any more), then say goodbye the way a
     * libvirt client does, so libvirtd does not log a connection that simply vanished. */
    leave_owner(l);
    l->state = VM_LINK_RETIRING;
    TAILQ_INSERT_TAIL(l->p.retiring, l, rentry);
    keepalive_stop(&l->ka);
    evtimer_del(l->timer);
    l->timer_is_idle = 0;
    wire_put_packet(conn_output(l->conn), VM_PROG_REMOTE, VM_PROC_CONNECT_CLOSE, VM_CALL,
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
    if (l->refs || l->ninflight || l->ninternal || l->state != VM_LINK_READY)
        return;
    /* A draining upstream keeps no spare connections: the last session out closes it. */
    int ms = l->draining ? 0 : l->up->pool.idle_timeout_s * 1000;
    arm_timer(l, ms, 1);
}

void link_set_draining(struct vm_link *l, int on)
{
    l->draining = on;
    if (l->timer_is_idle) {
        evtimer_del(l->timer);
        l->timer_is_idle = 0;
    }
    maybe_idle(l);
}

/* ---- sending ---- */

static void send_call(struct vm_link *l, int32_t proc, const void *args, size_t n)
{
    wire_put_packet(conn_output(l->conn), VM_PROG_REMOTE, proc, VM_CALL,
                    l->next_serial++, VM_STATUS_OK, args, n);
}

/* Take a free slot for `c`; its upstream serial names the slot, so the reply finds it in
 * O(1). The serials of one slot differ by their sequence part; replies never repeat. */
static void put_inflight(struct vm_link *l, struct vm_call *c)
{
    if (l->nfree == 0)
        abort(); /* a sender skipped link_has_room / slot_free: never write past the table */
    int slot = l->free_slots[--l->nfree];
    l->inflight[slot] = c;
    c->up_serial = ++l->seq << SLOT_BITS | (uint32_t)slot;
    if (c->internal)
        l->ninternal++;
    else
        l->ninflight++;
}

int link_send_internal(struct vm_link *l, uint32_t prog, int32_t proc, const void *args,
                       size_t n, vm_call_done_fn done, void *arg)
{
    if (l->state != VM_LINK_READY)
        return -1;
    struct vm_call *c = call_new(done, arg, 1);
    wire_put_packet(c->pkt, prog, proc, VM_CALL, 0, VM_STATUS_OK, args, n);
    c->hdr.prog = prog;
    c->hdr.proc = proc;
    if (!slot_free(l) || l->nwaiting) { /* FIFO: never overtake an earlier one */
        if (l->p.metrics)
            metrics_limit(l->p.metrics, VM_LIMIT_INTERNAL_RESERVE);
        TAILQ_INSERT_TAIL(&l->waiting, c, qentry);
        l->nwaiting++;
        return 0;
    }
    link_send(l, c);
    return 0;
}

/* A slot freed up: the gateway's own waiting calls go first (they are few and short). */
static void send_waiting(struct vm_link *l)
{
    struct vm_call *c;
    while (l->state == VM_LINK_READY && slot_free(l) && (c = TAILQ_FIRST(&l->waiting))) {
        TAILQ_REMOVE(&l->waiting, c, qentry);
        l->nwaiting--;
        link_send(l, c);
    }
}

/* Fail the gateway's own calls that never got a slot (the link went down). */
static void fail_waiting(struct vm_link *l, const char *msg)
{
    struct vm_call *c;
    while ((c = TAILQ_FIRST(&l->waiting))) {
        TAILQ_REMOVE(&l->waiting, c, qentry);
        l->nwaiting--;
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
    }
}

void link_send(struct vm_link *l, struct vm_call *c)
{
    put_inflight(l, c);
    c->link = l;
    wire_set_serial(c->pkt, c->up_serial);
    evbuffer_add_buffer(conn_output(l->conn), c->pkt); /* moved; the buffer stays, empty */
    if (l->timer_is_idle) {
        evtimer_del(l->timer);
        l->timer_is_idle = 0;
    }
}

static void clear_slot(struct vm_link *l, int i)
{
    struct vm_call *c = l->inflight[i];
    l->inflight[i] = NULL;
    l->free_slots[l->nfree++] = i;
    if (c->internal)
        l->ninternal--;
    else
        l->ninflight--;
    c->link = NULL;
}

static struct vm_call *take_inflight(struct vm_link *l, uint32_t serial)
{
    uint32_t slot = serial & ((1u << SLOT_BITS) - 1);
    if (slot >= (uint32_t)l->nslots)
        return NULL;
    struct vm_call *c = l->inflight[slot];
    if (!c || c->up_serial != serial)
        return NULL;
    clear_slot(l, (int)slot);
    return c;
}

/* ---- keepalive ---- */

static void ka_ping(void *arg)
{
    struct vm_link *l = arg;
    if (l->conn)
        wire_put_keepalive(conn_output(l->conn), VM_PROC_KEEPALIVE_PING);
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
    send_call(l, mech ? VM_PROC_AUTH_SASL_START : VM_PROC_AUTH_SASL_STEP, b.p, b.len);
    xb_free(&b);
}

static int sasl_secure(const struct vm_link *l)
{
    return l->up->uri.transport != VM_TR_TCP;
}

static struct bufferevent *wrap_layer(void *arg, struct bufferevent *under)
{
    return vmsasl_client_wrap(arg, under);
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
    vm_info(l->tag, "authenticated to libvirtd as SASL user %s%s", l->up->sasl_user,
            layer > 0 ? " (security layer on)" : "");
    if (layer > 0) {
        if (conn_push_filter(l->conn, wrap_layer, l->sasl) < 0) {
            link_down(l, NULL, 0, "cannot start the SASL security layer");
            return -1;
        }
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
    const struct vm_upstream_cfg *up = l->up;
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
            SSL *ssl = up->uri.transport == VM_TR_TLS ? bufferevent_openssl_get_ssl(conn_bev(l->conn)) : NULL;
            l->sasl = vmsasl_client_begin(up->sasl_user, up->sasl_password_file,
                                          up->uri.host ? up->uri.host : "localhost",
                                          sasl_secure(l), ssl ? SSL_get_cipher_bits(ssl, NULL) : 0,
                                          err, sizeof(err));
            if (!l->sasl) {
                link_down(l, NULL, 0, err);
                return;
            }
            l->hs = HS_SASL_INIT;
            send_call(l, VM_PROC_AUTH_SASL_INIT, NULL, 0);
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
        xb_opt_string(&b, l->p.name);
        xb_u32(&b, l->p.readonly ? 1 : 0);
        l->hs = HS_OPEN;
        send_call(l, VM_PROC_CONNECT_OPEN, b.p, b.len);
        xb_free(&b);
        return;
    }
    case HS_OPEN: {
        l->state = VM_LINK_READY;
        l->backoff_ms = BACKOFF_MIN_MS;
        l->down_since = 0;
        bufferevent_set_timeouts(conn_bev(l->conn), NULL, NULL);
        if (keepalive_start(&l->ka, l->p.base, l->p.keepalive_interval_s,
                            l->p.keepalive_count, ka_ping, ka_dead, l) < 0)
            vm_warn(l->tag, "cannot arm keepalive");
        vm_info(l->tag, "ready: opened \"%s\"%s", l->p.name, l->p.readonly ? " read-only" : "");
        if (l->dedicated)
            conn_set_low_mark(l->conn, 256u << 10);
        if (l->owner)
            l->ops->ready(l->owner, l);
        if (!l->dedicated && l->state != VM_LINK_CLOSED)
            maybe_idle(l);
        return;
    }
    default:
        vm_debug(l->tag, "unexpected handshake reply serial %u", h->serial);
    }
}

/* ---- reading ---- */

/* One packet from libvirtd (vm_conn ops). 0 to keep reading, -1 when the link went down. */
static int on_packet(void *owner, struct vm_conn *conn, const struct vm_hdr *hp,
                     struct evbuffer *pkt)
{
    struct vm_link *l = owner;
    struct vm_hdr h = *hp;
    if (l->state == VM_LINK_RETIRING) {
        if (h.type == VM_REPLY) {
            link_free(l); /* CONNECT_CLOSE answered */
            return -1;
        }
        return 0;
    }
    keepalive_touch(&l->ka);
    if (h.prog == VM_PROG_KEEPALIVE) {
        if (h.proc == VM_PROC_KEEPALIVE_PING)
            wire_put_keepalive(conn_output(l->conn), VM_PROC_KEEPALIVE_PONG);
        return 0;
    }
    if (l->state == VM_LINK_HANDSHAKE && (h.type == VM_REPLY || h.type == VM_REPLY_WITH_FDS)) {
        handshake_reply(l, &h, pkt);
        return l->conn ? 0 : -1;
    }
    if (l->dedicated) {
        if (l->owner)
            l->ops->packet(l->owner, l, &h, pkt);
        return l->conn ? 0 : -1;
    }
    if (h.type == VM_REPLY || h.type == VM_REPLY_WITH_FDS) {
        struct vm_call *c = take_inflight(l, h.serial);
        if (!c) {
            vm_warn(l->tag, "reply for unknown serial %u (%s) dropped", h.serial,
                    vm_proc_name(h.prog, h.proc, (char[32]){0}, 32));
            return 0;
        }
        call_finish(c, pkt);
        send_waiting(l);
        if (l->state == VM_LINK_CLOSED || !l->conn)
            return -1;
        if (l->owner && l->ops->slot_free)
            l->ops->slot_free(l->owner, l);
        maybe_idle(l);
        return 0;
    }
    if (h.type == VM_MESSAGE) {
        if (l->owner)
            l->ops->packet(l->owner, l, &h, pkt);
        return l->conn ? 0 : -1;
    }
    vm_debug(l->tag, "dropped packet type %u %s", h.type,
             vm_proc_name(h.prog, h.proc, (char[32]){0}, 32));
    return 0;
}

/* libvirt's TLS confirmation byte, before any frame. */
static int on_raw(void *owner, struct vm_conn *conn, struct evbuffer *in)
{
    struct vm_link *l = owner;
    uint8_t b;
    if (evbuffer_remove(in, &b, 1) != 1)
        return 0;
    if (b != 1) {
        link_down(l, NULL, 0, "libvirtd did not confirm the TLS session");
        return -1;
    }
    l->awaiting_confirm = 0;
    l->hs = HS_AUTH_LIST;
    send_call(l, VM_PROC_AUTH_LIST, NULL, 0);
    return 1;
}

static void on_bad_length(void *owner, struct vm_conn *conn, const uint8_t word[4])
{
    struct vm_link *l = owner;
    if (l->state == VM_LINK_RETIRING)
        link_free(l);
    else
        link_down(l, NULL, 0, "libvirtd sent an illegal length word");
}

static void on_drained(void *owner, struct vm_conn *conn)
{
    struct vm_link *l = owner;
    if (l->owner && l->ops->drained)
        l->ops->drained(l->owner, l);
}

static void on_event(void *owner, struct vm_conn *conn, short what)
{
    struct vm_link *l = owner;
    struct bufferevent *bev = conn_bev(conn);
    if (l->state == VM_LINK_RETIRING) {
        link_free(l);
        return;
    }
    if (what & BEV_EVENT_CONNECTED) {
        evutil_socket_t fd = bufferevent_getfd(bev);
        int one = 1;
        if (l->up->uri.transport != VM_TR_UNIX)
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        l->state = VM_LINK_HANDSHAKE;
        l->next_serial = HS_AUTH_LIST;
        const struct vm_upstream_cfg *up = l->up;
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
            conn_expect_raw(conn);
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
    else if (l->up->uri.transport == VM_TR_TLS &&
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

static const struct vm_conn_ops link_conn_ops = {
    .packet = on_packet,
    .raw = on_raw,
    .drained = on_drained,
    .event = on_event,
    .bad_length = on_bad_length,
};

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
    const struct vm_upstream_cfg *up = l->up;
    struct sockaddr_storage ss;
    socklen_t sslen;
    char err[300];
    l->state = VM_LINK_CONNECTING;
    if (make_addr(&up->uri, &ss, &sslen, err, sizeof(err)) < 0) {
        link_down(l, NULL, 0, err);
        return;
    }
    l->awaiting_confirm = 0;
    struct bufferevent *bev;
    if (up->uri.transport == VM_TR_TLS) {
        SSL *ssl = SSL_new(l->p.tls);
        if (!ssl)
            abort();
        const char *name = up->tls->server_name ? up->tls->server_name : up->uri.host;
        if (!up->tls->no_verify) {
            X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
            if (X509_VERIFY_PARAM_set1_ip_asc(vp, name) != 1)
                X509_VERIFY_PARAM_set1_host(vp, name, 0);
        }
        /* No SNI, like libvirt's own client. */
        bev = bufferevent_openssl_socket_new(l->p.base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                             BEV_OPT_CLOSE_ON_FREE);
    } else {
        bev = bufferevent_socket_new(l->p.base, -1, BEV_OPT_CLOSE_ON_FREE);
    }
    if (!bev)
        abort();
    int tls = up->uri.transport == VM_TR_TLS;
    l->conn = conn_new(bev, &link_conn_ops, l, tls ? 0 : VM_CONN_PLAIN);
    conn_count_bytes(l->conn, l->p.bytes);
    int ms = up->pool.connect_timeout_ms;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    bufferevent_set_timeouts(bev, &tv, &tv);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    vm_debug(l->tag, "connecting to %s", up->uri_text);
    if (bufferevent_socket_connect(bev, (struct sockaddr *)&ss, (int)sslen) < 0) {
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
    conn_free(l->conn);
    l->conn = NULL;
    vmsasl_client_end(l->sasl); /* after the bufferevent: its filter used the connection */
    l->sasl = NULL;
    if (l->state != VM_LINK_CLOSED && l->p.metrics)
        metrics_error(l->p.metrics, VM_ERRK_LINK_DOWN);
    if (l->state == VM_LINK_CLOSED)
        vm_debug(l->tag, "closed: %s", why);
    else if (was_ready || l->ninflight)
        vm_warn(l->tag, "connection lost: %s (%d calls in flight)", why, l->ninflight);
    else
        vm_warn(l->tag, "cannot connect: %s", why); /* an operator must hear of it */

    char msg[600];
    snprintf(msg, sizeof(msg), "internal error: virtmux lost its connection to upstream %s: %s",
             l->up->name, why);
    for (int i = 0; i < l->nslots; i++) {
        struct vm_call *c = l->inflight[i];
        if (!c)
            continue;
        clear_slot(l, i);
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
    }
    fail_waiting(l, msg);

    if (l->state == VM_LINK_CLOSED) {
        /* link_free is closing it: no reconnect; only a stream still attached hears of it */
        if (l->dedicated && l->owner) {
            void *owner = l->owner;
            l->owner = NULL;
            l->ops->down(owner, l, err_payload, n, why);
        }
        return;
    }
    l->state = VM_LINK_BACKOFF;
    if (!l->down_since)
        l->down_since = time(NULL);
    if (l->dedicated) {
        void *owner = l->owner;
        l->owner = NULL; /* a dedicated link is over once down: its owner hears of it once */
        if (owner)
            l->ops->down(owner, l, err_payload, n, why);
        if (l->state != VM_LINK_CLOSED)
            link_free(l);
        return;
    }
    if (l->timer_is_idle) {
        evtimer_del(l->timer);
        l->timer_is_idle = 0;
    }
    if (l->state != VM_LINK_CLOSED && l->refs > 0) {
        vm_info(l->tag, "reconnecting in %d ms", l->backoff_ms);
        arm_timer(l, l->backoff_ms, 0);
        l->backoff_ms = l->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : l->backoff_ms * 2;
    }
    if (l->state != VM_LINK_CLOSED && l->owner)
        l->ops->down(l->owner, l, err_payload, n, why);
    if (l->state != VM_LINK_CLOSED && l->refs == 0)
        link_free(l);
}
