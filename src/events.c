#include "events.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "call.h"
#include "config.h"
#include "env.h"
#include "log.h"
#include "metrics.h"
#include "proc.h"
#include "upstream.h"
#include "util.h"

enum reg_state {
    REG_IDLE,          /* not registered upstream (new, or the event link was lost) */
    REG_PENDING,       /* register call in flight */
    REG_ACTIVE,        /* up_id valid */
    REG_DEREGISTERING, /* deregister call in flight; re-registered if subscribers return */
};

struct vm_evreg;

struct vm_sub {
    struct vm_peer *c;      /* not owned: the client */
    struct vm_evreg *reg;   /* not owned */
    int32_t client_id;      /* the id this session knows */
    int pending;            /* its register call still waits for an answer */
    struct vm_hdr hdr;      /* that call, to answer it */
    TAILQ_ENTRY(vm_sub) reg_entry;
    TAILQ_ENTRY(vm_sub) sess_entry;
};

struct vm_evreg {
    struct vm_events *ev;
    uint32_t prog;
    int32_t reg_proc;
    uint8_t *args;          /* owned: the register arguments, the registration's identity */
    size_t nargs;
    enum reg_state state;
    int32_t up_id;
    int dead;               /* nobody wants it any more; free when the pending reply lands */
    int held;               /* waiting for the event link to come back, until held_until */
    struct timeval held_until;
    struct vm_sub_list subs; /* owned */
    int nsubs;
    TAILQ_ENTRY(vm_evreg) entry;
};

struct vm_events {
    struct vm_env *env;     /* not owned */
    const char *upstream;   /* not owned (config snapshot) */
    vm_ready_link_fn ready_link;
    void *owner;            /* not owned: the pool */
    struct vm_link *link;   /* the link holding the registrations; one reference held */
    TAILQ_HEAD(, vm_evreg) regs;
    int nregs;              /* including dead ones awaiting their reply */
    int nsubs;
    unsigned long cut_off;  /* subscribers dropped for not reading */
    int dying;              /* the pool is being freed: calls finishing now change nothing */
    int hold_ms;            /* how long a registration waits for a reconnecting event link */
    struct event *htimer;   /* owned: fires at the first held registration's deadline */
    int mup;                /* metrics slot of the upstream */
};

static void hold_timeout(evutil_socket_t fd, short what, void *arg);

struct vm_events *events_new(struct vm_env *env, const char *upstream, vm_ready_link_fn ready_link,
                             void *owner, int hold_ms)
{
    struct vm_events *ev = vm_calloc(1, sizeof(*ev));
    ev->env = env;
    ev->hold_ms = hold_ms;
    ev->htimer = evtimer_new(env->base, hold_timeout, ev);
    if (!ev->htimer)
        abort();
    ev->upstream = upstream;
    ev->ready_link = ready_link;
    ev->owner = owner;
    ev->mup = metrics_upstream(env->metrics, upstream);
    TAILQ_INIT(&ev->regs);
    return ev;
}

static void reg_free(struct vm_evreg *r)
{
    struct vm_events *ev = r->ev;
    TAILQ_REMOVE(&ev->regs, r, entry);
    ev->nregs--;
    free(r->args);
    free(r);
    if (ev->nregs == 0 && ev->link && !ev->dying) {
        struct vm_link *l = ev->link;
        ev->link = NULL;
        link_unref(l);
    }
}

void events_shutdown(struct vm_events *ev)
{
    ev->dying = 1;
    ev->link = NULL; /* the pool frees its links next; no reference games with them */
}

void events_free(struct vm_events *ev)
{
    ev->dying = 1;
    ev->link = NULL;
    struct vm_evreg *r;
    while ((r = TAILQ_FIRST(&ev->regs))) {
        struct vm_sub *sub;
        while ((sub = TAILQ_FIRST(&r->subs))) {
            TAILQ_REMOVE(&r->subs, sub, reg_entry);
            TAILQ_REMOVE(&sub->c->subs, sub, sess_entry);
            free(sub);
        }
        reg_free(r);
    }
    event_free(ev->htimer);
    free(ev);
}

int events_registrations(const struct vm_events *ev)
{
    int n = 0;
    if (!ev)
        return 0;
    const struct vm_evreg *r;
    TAILQ_FOREACH(r, &ev->regs, entry)
        if (r->state == REG_ACTIVE && !r->dead)
            n++;
    return n;
}

int events_subscribers(const struct vm_events *ev)
{
    return ev->nsubs;
}

int events_busy(const struct vm_events *ev)
{
    return ev && ev->nregs > 0;
}

/* The deregister procedure of a register procedure (generated table). */
static int32_t dereg_proc_of(uint32_t prog, int32_t reg_proc)
{
    return vm_proc_lookup(prog, reg_proc)->pair;
}

/* ---- answering subscribers ---- */

/* The subscriber's register call is answered (or abandoned): it no longer counts against the
 * session's max_client_requests. */
static void settle(struct vm_sub *sub)
{
    if (sub->pending) {
        sub->pending = 0;
        sub->c->ops->request_end(sub->c);
    }
}

static void sub_remove(struct vm_sub *sub)
{
    struct vm_evreg *r = sub->reg;
    settle(sub);
    TAILQ_REMOVE(&r->subs, sub, reg_entry);
    TAILQ_REMOVE(&sub->c->subs, sub, sess_entry);
    r->nsubs--;
    r->ev->nsubs--;
    free(sub);
}

static void answer_ok(struct vm_sub *sub)
{
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, sub->client_id);
    wire_put_reply(sub->c->ops->output(sub->c), &sub->hdr, b.p, b.len);
    xb_free(&b);
    settle(sub);
}

/* Fail every pending subscriber of `r`, with the upstream's error payload or our message. */
static void fail_pending(struct vm_evreg *r, const void *payload, size_t n, const char *message)
{
    struct vm_sub *sub, *next;
    for (sub = TAILQ_FIRST(&r->subs); sub; sub = next) {
        next = TAILQ_NEXT(sub, reg_entry);
        if (!sub->pending)
            continue;
        struct evbuffer *out = sub->c->ops->output(sub->c);
        if (payload)
            wire_put_packet(out, sub->hdr.prog, sub->hdr.proc, VM_REPLY, sub->hdr.serial,
                            VM_STATUS_ERROR, payload, n);
        else
            wire_put_error(out, &sub->hdr, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, message);
        sub_remove(sub);
    }
}

/* ---- upstream calls ---- */

static void send_register(struct vm_evreg *r);

/* The deregister call finished. libvirtd runs calls on worker threads, so a register for the
 * same key must not be sent before this (it would race ahead and be refused as "already
 * tracked"): subscribers that arrived meanwhile are registered now. */
static void deregister_done(void *arg, struct vm_call *c, const struct vm_hdr *h,
                            struct evbuffer *pkt, const struct vm_call_error *err)
{
    struct vm_evreg *r = arg;
    if (r->ev->dying)
        return; /* events_free frees it */
    r->state = REG_IDLE;
    if (r->nsubs == 0) {
        reg_free(r);
        return;
    }
    if (err)
        return; /* the link is gone: re-registered when it is back */
    send_register(r);
}

static void drop_reg(struct vm_evreg *r)
{
    if (r->state == REG_PENDING || r->state == REG_DEREGISTERING) {
        r->dead = 1; /* the reply decides */
        return;
    }
    if (r->state == REG_ACTIVE && r->ev->link) {
        struct xbuf b;
        xb_init(&b);
        xb_i32(&b, r->up_id);
        int rc = link_send_internal(r->ev->link, r->prog, dereg_proc_of(r->prog, r->reg_proc),
                                    b.p, b.len, deregister_done, r);
        xb_free(&b);
        if (rc == 0) {
            r->state = REG_DEREGISTERING;
            return;
        }
        vm_warn(link_tag(r->ev->link), "could not deregister event callback %d", r->up_id);
    }
    reg_free(r);
}

static void register_done(void *arg, struct vm_call *c, const struct vm_hdr *h,
                          struct evbuffer *pkt, const struct vm_call_error *err)
{
    struct vm_evreg *r = arg;
    if (r->ev->dying)
        return; /* events_free frees it */
    r->state = REG_IDLE;
    if (!h || h->status != VM_STATUS_OK) {
        const uint8_t *payload = NULL;
        size_t n = 0;
        if (h) {
            payload = evbuffer_pullup(pkt, -1) + VM_HDR_LEN;
            n = h->len - VM_HDR_LEN;
        }
        char msg[400];
        snprintf(msg, sizeof(msg), "internal error: virtmux could not register the event "
                 "upstream: %s", err ? err->message : "refused");
        fail_pending(r, payload, n, msg);
        if (r->dead || r->nsubs == 0)
            reg_free(r);
        return;
    }
    struct xrd rd;
    xr_init(&rd, evbuffer_pullup(pkt, -1) + VM_HDR_LEN, h->len - VM_HDR_LEN);
    int32_t id = xr_i32(&rd);
    if (rd.err) {
        fail_pending(r, NULL, 0, "internal error: undecodable event registration reply");
        if (r->nsubs == 0)
            reg_free(r);
        return;
    }
    r->up_id = id;
    r->state = REG_ACTIVE;
    vm_debug(link_tag(r->ev->link), "event registration %s: upstream callback %d (%d "
             "subscribers)", vm_proc_name(r->prog, r->reg_proc, (char[32]){0}, 32), id, r->nsubs);
    if (r->dead || r->nsubs == 0) {
        r->dead = 0;
        drop_reg(r);
        return;
    }
    struct vm_sub *sub;
    TAILQ_FOREACH(sub, &r->subs, reg_entry)
        if (sub->pending)
            answer_ok(sub);
}

/* Arm the hold timer for the earliest held registration (or disarm it). */
static void arm_hold(struct vm_events *ev)
{
    const struct timeval *first = NULL;
    struct vm_evreg *r;
    TAILQ_FOREACH(r, &ev->regs, entry)
        if (r->held && (!first || evutil_timercmp(&r->held_until, first, <)))
            first = &r->held_until;
    if (!first) {
        evtimer_del(ev->htimer);
        return;
    }
    struct timeval now, tv;
    event_base_gettimeofday_cached(ev->env->base, &now);
    if (evutil_timercmp(first, &now, <))
        evutil_timerclear(&tv);
    else
        evutil_timersub(first, &now, &tv);
    evtimer_add(ev->htimer, &tv);
}

/* Held registrations whose event link did not come back in time fail like held calls. */
static void hold_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct vm_events *ev = arg;
    struct timeval now;
    event_base_gettimeofday_cached(ev->env->base, &now);
    struct vm_evreg *r, *next;
    for (r = TAILQ_FIRST(&ev->regs); r; r = next) {
        next = TAILQ_NEXT(r, entry);
        if (!r->held || evutil_timercmp(&now, &r->held_until, <))
            continue;
        r->held = 0;
        metrics_limit(ev->env->metrics, VM_LIMIT_RECONNECT_HOLD);
        char msg[300];
        snprintf(msg, sizeof(msg), "internal error: virtmux cannot reach upstream %s for event "
                 "registration (the call waited %d ms)", ev->upstream, ev->hold_ms);
        fail_pending(r, NULL, 0, msg);
        if (r->nsubs == 0)
            reg_free(r);
    }
    arm_hold(ev);
}

/* Send the register call of `r` on the event link; while that link reconnects the subscribers
 * wait for it (hold_ms), else they fail now. */
static void send_register(struct vm_evreg *r)
{
    struct vm_events *ev = r->ev;
    if (!ev->link) {
        struct vm_link *l = ev->ready_link(ev->owner);
        if (l) {
            ev->link = l;
            link_ref(l);
        }
    }
    if (ev->link && link_state(ev->link) == VM_LINK_READY &&
        link_send_internal(ev->link, r->prog, r->reg_proc, r->args, r->nargs, register_done, r) == 0) {
        r->state = REG_PENDING;
        if (r->held) {
            r->held = 0;
            arm_hold(ev);
        }
        return;
    }
    enum vm_link_state st = ev->link ? link_state(ev->link) : VM_LINK_CLOSED;
    if (ev->hold_ms > 0 && (st == VM_LINK_BACKOFF || st == VM_LINK_CONNECTING ||
                            st == VM_LINK_HANDSHAKE)) {
        /* The event link is reconnecting (our reference keeps it trying): wait for it. */
        if (!r->held) {
            struct timeval now, add = {ev->hold_ms / 1000, (ev->hold_ms % 1000) * 1000};
            event_base_gettimeofday_cached(ev->env->base, &now);
            evutil_timeradd(&now, &add, &r->held_until);
            r->held = 1;
            arm_hold(ev);
        }
        return;
    }
    char msg[300];
    snprintf(msg, sizeof(msg), "internal error: virtmux has no connection to upstream %s for "
             "event registration right now", ev->upstream);
    fail_pending(r, NULL, 0, msg);
    if (r->nsubs == 0)
        reg_free(r);
}

/* ---- sessions ---- */

void events_subscribe(struct vm_events *ev, struct vm_peer *c, const struct vm_hdr *h,
                      const uint8_t *args, size_t n)
{
    struct vm_sub *sub;
    int mine = 0;
    TAILQ_FOREACH(sub, &c->subs, sess_entry)
        mine++;
    int max = ev->env->cfg->event_max_per_session;
    if (mine >= max) {
        metrics_limit(ev->env->metrics, VM_LIMIT_EVENTS_PER_SESSION);
        metrics_error_code(ev->env->metrics, VIR_ERR_OPERATION_FAILED);
        char msg[200];
        snprintf(msg, sizeof(msg), "operation failed: this connection already holds %d event "
                 "registrations (virtmux events.max_per_session)", max);
        wire_put_error(c->ops->output(c), h, VIR_ERR_OPERATION_FAILED, VIR_FROM_NONE, msg);
        return;
    }
    struct vm_evreg *r;
    TAILQ_FOREACH(r, &ev->regs, entry)
        if (r->prog == h->prog && r->reg_proc == h->proc && r->nargs == n &&
            memcmp(r->args, args, n) == 0)
            break;
    if (r)
        r->dead = 0; /* one registration per key: revive one that was on its way out */
    if (!r) {
        r = vm_calloc(1, sizeof(*r));
        r->ev = ev;
        r->prog = h->prog;
        r->reg_proc = h->proc;
        r->args = malloc(n ? n : 1);
        if (!r->args)
            abort();
        memcpy(r->args, args, n);
        r->nargs = n;
        r->state = REG_IDLE;
        TAILQ_INIT(&r->subs);
        TAILQ_INSERT_TAIL(&ev->regs, r, entry);
        ev->nregs++;
    }
    TAILQ_FOREACH(sub, &r->subs, reg_entry) {
        if (sub->c == c) { /* libvirtd's answer to the same registration twice */
            wire_put_error(c->ops->output(c), h, VIR_ERR_INVALID_ARG, VIR_FROM_NONE,
                           "invalid argument: event callback already tracked");
            return;
        }
    }
    sub = vm_calloc(1, sizeof(*sub));
    sub->c = c;
    sub->reg = r;
    sub->client_id = c->next_cb_id++;
    sub->pending = 1;
    c->ops->request_begin(c);
    sub->hdr = *h;
    TAILQ_INSERT_TAIL(&r->subs, sub, reg_entry);
    TAILQ_INSERT_TAIL(&c->subs, sub, sess_entry);
    r->nsubs++;
    ev->nsubs++;
    if (r->state == REG_ACTIVE)
        answer_ok(sub);
    else if (r->state == REG_IDLE)
        send_register(r);
}

void events_unsubscribe(struct vm_events *ev, struct vm_peer *c, const struct vm_hdr *h,
                        int32_t client_id)
{
    struct vm_sub *sub;
    TAILQ_FOREACH(sub, &c->subs, sess_entry)
        if (sub->client_id == client_id && !sub->pending)
            break;
    if (!sub) {
        /* libvirtd's wording, family by family. */
        const char *family =
            h->prog == VM_PROG_QEMU                                  ? "qemu monitor"
            : h->proc == VM_PROC_CONNECT_NETWORK_EVENT_DEREGISTER_ANY ? "network"
            : h->proc == VM_PROC_CONNECT_STORAGE_POOL_EVENT_DEREGISTER_ANY ? "storage pool"
            : h->proc == VM_PROC_CONNECT_NODE_DEVICE_EVENT_DEREGISTER_ANY  ? "node device"
            : h->proc == VM_PROC_CONNECT_SECRET_EVENT_DEREGISTER_ANY       ? "secret"
                                                                           : "domain";
        char msg[160];
        snprintf(msg, sizeof(msg), "internal error: %s event callback %d not registered",
                 family, client_id);
        wire_put_error(c->ops->output(c), h, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
        return;
    }
    struct vm_evreg *r = sub->reg;
    sub_remove(sub);
    wire_put_reply(c->ops->output(c), h, NULL, 0);
    if (r->nsubs == 0)
        drop_reg(r);
}

void events_peer_gone(struct vm_events *ev, struct vm_peer *c)
{
    struct vm_sub *sub;
    while ((sub = TAILQ_FIRST(&c->subs))) {
        struct vm_evreg *r = sub->reg;
        sub_remove(sub);
        if (r->nsubs == 0)
            drop_reg(r);
    }
}

/* ---- upstream ---- */

void events_deliver(struct vm_events *ev, struct vm_link *l, const struct vm_hdr *h,
                    struct evbuffer *pkt)
{
    const struct vm_proc_info *info = vm_proc_lookup(h->prog, h->proc);
    if (l != ev->link || !info || info->kind != VM_PK_EVENT || !info->cb_first ||
        h->len < VM_HDR_LEN + 4)
        return;
    uint8_t *raw = evbuffer_pullup(pkt, -1);
    int32_t up_id = (int32_t)((uint32_t)raw[28] << 24 | (uint32_t)raw[29] << 16 |
                              (uint32_t)raw[30] << 8 | raw[31]);
    int32_t family = info->family; /* callback ids are per register procedure */
    struct vm_evreg *r;
    TAILQ_FOREACH(r, &ev->regs, entry)
        if (r->state == REG_ACTIVE && !r->dead && r->up_id == up_id && r->prog == h->prog &&
            r->reg_proc == family)
            break;
    if (!r) {
        vm_debug(link_tag(l), "event %s for unknown callback %d dropped", info->name, up_id);
        return;
    }
    /* Deliver to every subscriber, then cut off those that stopped reading. */
    struct vm_peer **overflow = NULL;
    int nover = 0, capover = 0;
    unsigned delivered = 0;
    struct vm_sub *sub;
    TAILQ_FOREACH(sub, &r->subs, reg_entry) {
        if (sub->pending)
            continue;
        delivered++;
        raw[28] = (uint8_t)((uint32_t)sub->client_id >> 24);
        raw[29] = (uint8_t)((uint32_t)sub->client_id >> 16);
        raw[30] = (uint8_t)((uint32_t)sub->client_id >> 8);
        raw[31] = (uint8_t)sub->client_id;
        if (sub->c->ops->push_event(sub->c, raw, h->len) < 0) {
            if (nover == capover) {
                capover = capover ? capover * 2 : 8;
                overflow = realloc(overflow, (size_t)capover * sizeof(*overflow));
                if (!overflow)
                    abort();
            }
            overflow[nover++] = sub->c;
        }
    }
    metrics_events_delivered(ev->env->metrics, ev->mup, delivered - (unsigned)nover);
    for (int i = 0; i < nover; i++) {
        ev->cut_off++;
        metrics_limit(ev->env->metrics, VM_LIMIT_EVENT_QUEUE_BYTES);
        metrics_subscriber_dropped(ev->env->metrics, ev->mup);
        vm_warn(overflow[i]->tag, "event queue overflow: subscriber cut off, it does "
                "not read (%lu so far)", ev->cut_off);
        overflow[i]->ops->close(overflow[i], "event queue overflow: the client does not read");
    }
    free(overflow);
}

void events_link_ready(struct vm_events *ev, struct vm_link *l)
{
    if (ev->link && l != ev->link && link_state(ev->link) != VM_LINK_READY) {
        /* The event link is still away (it may never come back: give_up_s) while another
         * link of the pool is READY: the registrations move there. Nothing is in flight on
         * the old one, its failure answered or idled every registration. */
        struct vm_link *old = ev->link;
        ev->link = l;
        link_ref(l);
        vm_info(link_tag(l), "takes over the event registrations from %s", link_tag(old));
        link_unref(old); /* may free it */
    }
    if (l != ev->link)
        return;
    int n = 0;
    struct vm_evreg *r, *next;
    for (r = TAILQ_FIRST(&ev->regs); r; r = next) {
        next = TAILQ_NEXT(r, entry);
        if (r->state == REG_IDLE && !r->dead) {
            send_register(r);
            n++;
        }
    }
    if (n)
        vm_info(link_tag(l), "re-registered %d event registrations", n);
}

void events_link_down(struct vm_events *ev, struct vm_link *l)
{
    if (l != ev->link)
        return;
    struct vm_evreg *r;
    TAILQ_FOREACH(r, &ev->regs, entry)
        if (r->state == REG_ACTIVE)
            r->state = REG_IDLE; /* re-registered when the link is back */
}
