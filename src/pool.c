/*
 * Pools: which upstream connection carries a call.
 *
 *   pool_submit(call, home)
 *     home READY with room ............ send on home
 *     another READY link with room .... spill (every forwarded call is stateless per socket)
 *     fewer than max_connections ...... open a new link, queue the call
 *     a link is (re)connecting ........ queue the call (queue_timeout_ms)
 *     a link will retry (libvirtd is
 *       restarting), or paused ........ queue the call (reconnect_hold_ms, see "holding")
 *     nothing can carry it ............ fail it now with the last connection error
 *
 * A slot freeing up or a link becoming READY pumps the queue: owners (sessions) with waiting
 * calls take turns, one call each, and each owner's calls leave in their own order; a deep
 * pipeline from one client only delays that client. The queue timer fails calls in arrival
 * order once they waited queue_timeout_ms.
 *
 * Holding: while no call can leave (the last READY link went down and a link with sessions
 * is reconnecting, or an operator paused the upstream) the pool is "held" since a time;
 * a waiting call's deadline is then the earlier of its queue deadline and
 * max(queued_at, held_since) + reconnect_hold_ms. Both are in arrival order, so the queue
 * head always has the first deadline. Calls that were in flight when a link died are not
 * the pool's: the link fails them at once (they may have run). New OPENs wait the same way
 * (their vm_open_wait gets the deadline).
 */
#include "pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "cache.h"
#include "call.h"
#include "config.h"
#include "events.h"
#include "env.h"
#include "log.h"
#include "metrics.h"
#include "reap.h"
#include "upstream.h"
#include "util.h"

struct link_node {
    struct vm_link *link;
    TAILQ_ENTRY(link_node) entry;
};

struct vm_pool {
    struct vm_env *env;                 /* not owned */
    const struct vm_pool_ops *ops;
    void *owner;                        /* not owned: the gateway */
    SSL_CTX *tls;                       /* not owned: client context for tls:// upstreams */
    const struct vm_upstream_cfg *up;   /* not owned (config snapshot) */
    char *name;                         /* owned: the name opened upstream */
    int readonly;
    char tag[200];
    TAILQ_HEAD(, link_node) links;      /* owned nodes; links free themselves via link_free */
    int nlinks;
    struct vm_call_list queue;          /* calls waiting, in arrival order; owned by sessions */
    int nqueued;
    TAILQ_HEAD(, vm_fair) turns;        /* owners with waiting calls, in serving order */
    struct vm_fair anon;                /* for calls that name no owner */
    struct event *qtimer;               /* owned: fires at the head's deadline */
    struct vm_open_wait **waiters;      /* sessions whose OPEN waits for a READY link */
    int nwaiters, capwaiters;
    char last_error[256];
    struct vm_events *events;           /* owned */
    struct vm_cache *cache;             /* owned: coalescing and the micro-cache; NULL: off */
    int nstreams;                       /* stream slots taken (max_streams) */
    TAILQ_HEAD(, vm_slot_wait) swait;   /* streams waiting for a slot; owned by their streams */
    int nswait;
    struct event *stimer;               /* owned: fires at the first waiter's deadline */
    int dying;                          /* pool_free in progress */
    enum vm_upstream_op op;             /* the upstream's operator state */
    struct timeval held_since;          /* no call could leave since (outage or pause); 0: none */
    void *refusal;                      /* owned: libvirtd's refusal of the name (error payload) */
    size_t nrefusal;
    char refusal_msg[600];
    struct event *rtimer;               /* owned: forgets the refusal */
    struct event *otimer;               /* owned: fires at the first held open's deadline */
    int mup;                            /* metrics slot of the upstream */
};

static void queue_timeout(evutil_socket_t fd, short what, void *arg);
static void unavailable_message(struct vm_pool *p, char *buf, size_t len);
static void unqueue(struct vm_pool *p, struct vm_call *c);
static const struct vm_link_ops pool_link_ops;
static void stream_wait_timeout(evutil_socket_t fd, short what, void *arg);
static struct vm_link *least_referenced_ready(struct vm_pool *p);
static void refusal_expired(evutil_socket_t fd, short what, void *arg);
static int hold_ms(const struct vm_pool *p);
static void open_hold_timeout(evutil_socket_t fd, short what, void *arg);
static void hold_waiters(struct vm_pool *p);
static void arm_for(struct vm_pool *p, struct event *timer, const struct timeval *deadline);
static int held(const struct vm_pool *p);
static int any_retrying(struct vm_pool *p);
static void pump(struct vm_pool *p);
static void forget_refusal(struct vm_pool *p);
static void remember_refusal(struct vm_pool *p, const void *payload, size_t n,
                             const char *message);

const char *pool_op_name(enum vm_upstream_op op)
{
    switch (op) {
    case VM_UP_PAUSED:
        return "paused";
    case VM_UP_DRAINING:
        return "draining";
    default:
        return "active";
    }
}

static struct vm_link *ready_link_for_events(void *owner)
{
    return least_referenced_ready(owner);
}

struct vm_pool *pool_new(struct vm_env *env, const struct vm_pool_ops *ops, void *owner,
                         const struct vm_upstream_cfg *up, const char *name, int readonly,
                         SSL_CTX *tls)
{
    struct vm_pool *p = vm_calloc(1, sizeof(*p));
    p->env = env;
    p->ops = ops;
    p->owner = owner;
    p->tls = tls;
    p->up = up;
    p->name = strdup(name);
    p->readonly = readonly;
    TAILQ_INIT(&p->links);
    TAILQ_INIT(&p->queue);
    TAILQ_INIT(&p->turns);
    TAILQ_INIT(&p->anon.calls);
    snprintf(p->tag, sizeof(p->tag), "P:%s %s%s", up->name, name, readonly ? " ro" : "");
    p->qtimer = evtimer_new(env->base, queue_timeout, p);
    p->stimer = evtimer_new(env->base, stream_wait_timeout, p);
    p->rtimer = evtimer_new(env->base, refusal_expired, p);
    p->otimer = evtimer_new(env->base, open_hold_timeout, p);
    TAILQ_INIT(&p->swait);
    if (!p->name || !p->qtimer || !p->stimer || !p->rtimer || !p->otimer)
        abort();
    snprintf(p->last_error, sizeof(p->last_error), "not connected yet");
    p->mup = metrics_upstream(env->metrics, up->name);
    p->events = events_new(env, up->name, ready_link_for_events, p, hold_ms(p));
    p->cache = cache_new(env, up, readonly, p->events, p->mup);
    return p;
}

void pool_free(struct vm_pool *p)
{
    p->dying = 1; /* links leaving below must not re-enter the gateway's pool check */
    /* Links first (their failing event calls must find the registrations, told to stay
     * put), then the events state. */
    events_shutdown(p->events);
    cache_shutdown(p->cache);
    struct link_node *n;
    while ((n = TAILQ_FIRST(&p->links)))
        link_free(n->link); /* tells on_link_gone, which removes the node */
    events_free(p->events);
    p->events = NULL;
    struct vm_call *c;
    while ((c = TAILQ_FIRST(&p->queue))) {
        unqueue(p, c);
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, "internal error: virtmux is shutting down");
    }
    cache_free(p->cache); /* after the calls: shared ones hand their callers the failure */
    event_free(p->qtimer);
    event_free(p->stimer);
    event_free(p->rtimer);
    event_free(p->otimer);
    free(p->refusal);
    free(p->waiters);
    free(p->name);
    free(p);
}

int pool_matches(const struct vm_pool *p, const struct vm_upstream_cfg *up, const char *name,
                 int readonly)
{
    return p->up == up && p->readonly == readonly && strcmp(p->name, name) == 0;
}

const char *pool_name(const struct vm_pool *p)
{
    return p->name;
}

const struct vm_upstream_cfg *pool_upstream(const struct vm_pool *p)
{
    return p->up;
}

int pool_readonly(const struct vm_pool *p)
{
    return p->readonly;
}

int pool_is_empty(const struct vm_pool *p)
{
    if (p->dying)
        return 0;
    return p->nlinks == 0 && p->nwaiters == 0 && p->nqueued == 0 && p->nstreams == 0 &&
           p->nswait == 0 && !events_busy(p->events) && !p->refusal;
}

int pool_retire_idle(struct vm_pool *p)
{
    int busy = 0;
    struct link_node *n, *next;
    /* link_retire tells on_link_gone at once, which frees the node: step ahead first. */
    for (n = TAILQ_FIRST(&p->links); n; n = next) {
        next = TAILQ_NEXT(n, entry);
        struct vm_link *l = n->link;
        if (link_refs(l) || link_inflight(l) || link_internal(l)) {
            busy++;
            continue;
        }
        link_retire(l);
    }
    return busy;
}

struct vm_events *pool_events(const struct vm_pool *p)
{
    return p->events;
}

struct vm_cache *pool_cache(const struct vm_pool *p)
{
    return p->cache;
}

void pool_link_params(struct vm_pool *p, struct vm_link_params *lp)
{
    const struct vm_config *cfg = p->env->cfg;
    *lp = (struct vm_link_params){
        .base = p->env->base,
        .reaper = p->env->reaper,
        .retiring = p->env->retiring,
        .up = p->up,
        .name = p->name,
        .readonly = p->readonly,
        .id = env_next_id(p->env),
        .tls = p->tls,
        .keepalive_interval_s = cfg->keepalive_interval_s,
        .keepalive_count = cfg->keepalive_count,
        .metrics = p->env->metrics,
        .bytes = metrics_upstream_bytes(p->env->metrics, p->mup),
    };
}

/* ---- choosing links ---- */

static struct vm_link *least_loaded_ready(struct vm_pool *p, int need_room)
{
    struct vm_link *best = NULL;
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        struct vm_link *l = n->link;
        if (link_state(l) != VM_LINK_READY || (need_room && !link_has_room(l)))
            continue;
        if (!best || link_inflight(l) < link_inflight(best))
            best = l;
    }
    return best;
}

static struct vm_link *least_referenced_ready(struct vm_pool *p)
{
    struct vm_link *best = NULL;
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        struct vm_link *l = n->link;
        if (link_state(l) == VM_LINK_READY && (!best || link_refs(l) < link_refs(best)))
            best = l;
    }
    return best;
}

static int any_connecting(struct vm_pool *p)
{
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        enum vm_link_state st = link_state(n->link);
        if (st == VM_LINK_CONNECTING || st == VM_LINK_HANDSHAKE)
            return 1;
    }
    return 0;
}

/* A link that will come back by itself: connecting, or backing off with sessions homed on it
 * (one without sessions is freed when it goes down). */
static int any_retrying(struct vm_pool *p)
{
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        enum vm_link_state st = link_state(n->link);
        if (st == VM_LINK_CONNECTING || st == VM_LINK_HANDSHAKE ||
            (st == VM_LINK_BACKOFF && link_refs(n->link) > 0))
            return 1;
    }
    return 0;
}

static void add_link(struct vm_pool *p)
{
    struct link_node *n = vm_calloc(1, sizeof(*n));
    TAILQ_INSERT_TAIL(&p->links, n, entry);
    p->nlinks++;
    struct vm_link_params lp;
    pool_link_params(p, &lp);
    n->link = link_new(&lp, &pool_link_ops, p);
    if (p->op == VM_UP_DRAINING)
        link_set_draining(n->link, 1);
}

/* Make sure some link is on its way to READY: grow, or cut a backoff short. */
static void ensure_connecting(struct vm_pool *p)
{
    if (any_connecting(p))
        return;
    if (p->nlinks < p->up->pool.max_connections) {
        add_link(p);
        return;
    }
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        if (link_state(n->link) == VM_LINK_BACKOFF) {
            link_reconnect_now(n->link);
            return;
        }
    }
}

/* ---- opening sessions ---- */

void pool_open(struct vm_pool *p, struct vm_open_wait *w)
{
    if (p->op == VM_UP_DRAINING) {
        char msg[300];
        snprintf(msg, sizeof(msg), "internal error: virtmux upstream %s is draining for "
                 "maintenance: it takes no new connections", p->up->name);
        w->done(w, NULL, NULL, 0, msg);
        return;
    }
    struct vm_link *l = least_referenced_ready(p);
    if (l) {
        link_ref(l);
        w->done(w, l, NULL, 0, NULL);
        return;
    }
    if (p->refusal) {
        /* libvirtd refused this name moments ago: the same answer, no new connection. */
        vm_debug(p->tag, "open refused from the cache (libvirtd refused it < %d ms ago)",
                 VM_REFUSAL_CACHE_MS);
        w->done(w, NULL, p->refusal, p->nrefusal, p->refusal_msg);
        return;
    }
    if (p->nwaiters == p->capwaiters) {
        p->capwaiters = p->capwaiters ? p->capwaiters * 2 : 8;
        p->waiters = realloc(p->waiters, (size_t)p->capwaiters * sizeof(*p->waiters));
        if (!p->waiters)
            abort();
    }
    p->waiters[p->nwaiters++] = w;
    evutil_timerclear(&w->deadline);
    if (held(p) && p->op != VM_UP_PAUSED && any_retrying(p)) {
        hold_waiters(p); /* libvirtd is restarting: the links retry on their own timers */
        return;
    }
    ensure_connecting(p);
}

void pool_cancel_open(struct vm_pool *p, struct vm_open_wait *w)
{
    for (int i = 0; i < p->nwaiters; i++) {
        if (p->waiters[i] == w) {
            memmove(&p->waiters[i], &p->waiters[i + 1],
                    (size_t)(p->nwaiters - i - 1) * sizeof(*p->waiters));
            p->nwaiters--;
            return;
        }
    }
}

/* Arm the open timer for the first held waiter's deadline, or disarm it. */
static void arm_otimer(struct vm_pool *p)
{
    const struct timeval *first = NULL;
    for (int i = 0; i < p->nwaiters; i++) {
        const struct timeval *d = &p->waiters[i]->deadline;
        if (evutil_timerisset(d) && (!first || evutil_timercmp(d, first, <)))
            first = d;
    }
    arm_for(p, p->otimer, first);
}

/* Every waiting OPEN without a deadline gets one: now + the hold. */
static void hold_waiters(struct vm_pool *p)
{
    struct timeval now, add = {hold_ms(p) / 1000, (hold_ms(p) % 1000) * 1000};
    event_base_gettimeofday_cached(p->env->base, &now);
    for (int i = 0; i < p->nwaiters; i++)
        if (!evutil_timerisset(&p->waiters[i]->deadline))
            evutil_timeradd(&now, &add, &p->waiters[i]->deadline);
    arm_otimer(p);
}

static void open_hold_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct vm_pool *p = arg;
    struct timeval now;
    event_base_gettimeofday_cached(p->env->base, &now);
    char why[600], msg[700];
    unavailable_message(p, why, sizeof(why));
    snprintf(msg, sizeof(msg), "%s (the open waited %d ms)", why, hold_ms(p));
    for (int i = 0; i < p->nwaiters;) {
        struct vm_open_wait *w = p->waiters[i];
        if (!evutil_timerisset(&w->deadline) || evutil_timercmp(&now, &w->deadline, <)) {
            i++;
            continue;
        }
        pool_cancel_open(p, w);
        metrics_limit(p->env->metrics, VM_LIMIT_RECONNECT_HOLD);
        w->done(w, NULL, NULL, 0, msg);
    }
    arm_otimer(p);
    p->ops->maybe_empty(p->owner, p);
}

/* Answer every waiting OPEN with a failure. */
static void fail_waiters(struct vm_pool *p, const void *err_payload, size_t n, const char *message)
{
    while (p->nwaiters > 0) {
        struct vm_open_wait *w = p->waiters[0];
        pool_cancel_open(p, w);
        w->done(w, NULL, err_payload, n, message);
    }
    arm_otimer(p);
}

/* ---- the queue ---- */

/* Deadline of a new waiter: now + queue_timeout_ms (deadlines grow along a FIFO). */
static void set_deadline(struct vm_pool *p, struct timeval *deadline)
{
    struct timeval now, add;
    int ms = p->env->cfg->queue_timeout_ms;
    event_base_gettimeofday_cached(p->env->base, &now);
    add.tv_sec = ms / 1000;
    add.tv_usec = (ms % 1000) * 1000;
    evutil_timeradd(&now, &add, deadline);
}

/* Arm `timer` for the FIFO head's `deadline`, or disarm it when the FIFO is empty. */
static void arm_for(struct vm_pool *p, struct event *timer, const struct timeval *deadline)
{
    if (!deadline) {
        evtimer_del(timer);
        return;
    }
    struct timeval now, tv;
    event_base_gettimeofday_cached(p->env->base, &now);
    if (evutil_timercmp(deadline, &now, <))
        evutil_timerclear(&tv);
    else
        evutil_timersub(deadline, &now, &tv);
    evtimer_add(timer, &tv);
}

/* How long a call may be held while nothing can leave: reconnect_hold_ms within the queue
 * timeout; a pause with no hold configured waits for the queue timeout. */
static int hold_ms(const struct vm_pool *p)
{
    int qt = p->env->cfg->queue_timeout_ms, h = p->up->pool.reconnect_hold_ms;
    if (h == 0 && p->op == VM_UP_PAUSED)
        return qt;
    return h < qt ? h : qt;
}

/* Whether calls that nothing can carry now should wait rather than fail: a paused upstream,
 * or a reconnect on its way with a hold configured. */
static int holding(struct vm_pool *p)
{
    return p->op == VM_UP_PAUSED || (p->up->pool.reconnect_hold_ms > 0 && any_retrying(p));
}

static int held(const struct vm_pool *p)
{
    return evutil_timerisset(&p->held_since);
}

/* When `c` must leave the queue; *by_hold says the hold, not the queue timeout, ends it. */
static struct timeval due(const struct vm_pool *p, const struct vm_call *c, int *by_hold)
{
    *by_hold = 0;
    if (!held(p))
        return c->deadline;
    const struct timeval *from =
        evutil_timercmp(&c->queued_at, &p->held_since, <) ? &p->held_since : &c->queued_at;
    int ms = hold_ms(p);
    struct timeval add = {ms / 1000, (ms % 1000) * 1000}, t;
    evutil_timeradd(from, &add, &t);
    if (!evutil_timercmp(&t, &c->deadline, <))
        return c->deadline;
    *by_hold = 1;
    return t;
}

static void arm_qtimer(struct vm_pool *p)
{
    struct vm_call *head = TAILQ_FIRST(&p->queue);
    int by_hold;
    struct timeval d;
    if (head)
        d = due(p, head, &by_hold);
    arm_for(p, p->qtimer, head ? &d : NULL);
}

static void hold_begin(struct vm_pool *p)
{
    if (held(p))
        return;
    event_base_gettimeofday_cached(p->env->base, &p->held_since);
    vm_info(p->tag, "holding new calls up to %d ms (%s)", hold_ms(p),
            p->op == VM_UP_PAUSED ? "paused" : "reconnecting");
    arm_qtimer(p);
}

static void hold_end(struct vm_pool *p)
{
    if (!held(p))
        return;
    evutil_timerclear(&p->held_since);
    vm_info(p->tag, "no longer holding calls (%d waiting go out)", p->nqueued);
}

static void enqueue(struct vm_pool *p, struct vm_call *c)
{
    set_deadline(p, &c->deadline);
    event_base_gettimeofday_cached(p->env->base, &c->queued_at);
    int was_empty = TAILQ_EMPTY(&p->queue);
    TAILQ_INSERT_TAIL(&p->queue, c, qentry);
    p->nqueued++;
    struct vm_fair *f = c->fair ? c->fair : &p->anon;
    if (TAILQ_EMPTY(&f->calls))
        TAILQ_INSERT_TAIL(&p->turns, f, entry);
    TAILQ_INSERT_TAIL(&f->calls, c, fentry);
    if (was_empty)
        arm_qtimer(p);
}

/* Take `c` out of the queue (arrival order and its owner's turn). */
static void unqueue(struct vm_pool *p, struct vm_call *c)
{
    TAILQ_REMOVE(&p->queue, c, qentry);
    p->nqueued--;
    struct vm_fair *f = c->fair ? c->fair : &p->anon;
    TAILQ_REMOVE(&f->calls, c, fentry);
    if (TAILQ_EMPTY(&f->calls))
        TAILQ_REMOVE(&p->turns, f, entry);
}

/* The next call to send: the first waiting call of the owner whose turn it is; that owner
 * goes to the back of the line. */
static struct vm_call *next_turn(struct vm_pool *p)
{
    struct vm_fair *f = TAILQ_FIRST(&p->turns);
    if (!f)
        return NULL;
    struct vm_call *c = TAILQ_FIRST(&f->calls);
    unqueue(p, c);
    if (!TAILQ_EMPTY(&f->calls)) {
        TAILQ_REMOVE(&p->turns, f, entry);
        TAILQ_INSERT_TAIL(&p->turns, f, entry);
    }
    return c;
}

static void queue_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct vm_pool *p = arg;
    struct timeval now;
    event_base_gettimeofday_cached(p->env->base, &now);
    struct vm_call *c;
    int ms = p->env->cfg->queue_timeout_ms;
    while ((c = TAILQ_FIRST(&p->queue))) {
        int by_hold;
        struct timeval d = due(p, c, &by_hold);
        if (evutil_timercmp(&now, &d, <))
            break;
        unqueue(p, c);
        if (by_hold) {
            char msg[800], why[600];
            if (p->op == VM_UP_PAUSED)
                snprintf(why, sizeof(why), "internal error: virtmux upstream %s is paused for "
                         "maintenance", p->up->name);
            else
                unavailable_message(p, why, sizeof(why));
            snprintf(msg, sizeof(msg), "%s (the call waited %d ms)", why, hold_ms(p));
            vm_warn(p->tag, "held call given up after %d ms (%d still queued)", hold_ms(p),
                    p->nqueued);
            metrics_limit(p->env->metrics, VM_LIMIT_RECONNECT_HOLD);
            call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
            continue;
        }
        char msg[400];
        /* Busy links are no error: name the last connection failure only if there is one. */
        snprintf(msg, sizeof(msg),
                 "operation timed out: virtmux waited %d ms for a free connection to upstream %s"
                 "%s%s%s", ms, p->up->name, p->last_error[0] ? " (" : "", p->last_error,
                 p->last_error[0] ? ")" : "");
        vm_warn(p->tag, "queue timeout after %d ms (%d still queued)", ms, p->nqueued);
        metrics_limit(p->env->metrics, VM_LIMIT_QUEUE_TIMEOUT);
        call_fail(c, VIR_ERR_OPERATION_TIMEOUT, VIR_FROM_RPC, msg);
    }
    arm_qtimer(p);
    p->ops->maybe_empty(p->owner, p);
}

/* Move queued calls onto links with room, oldest first. */
static void pump(struct vm_pool *p)
{
    while (p->op != VM_UP_PAUSED && !TAILQ_EMPTY(&p->queue)) {
        struct vm_link *l = least_loaded_ready(p, 1);
        if (!l)
            break;
        link_send(l, next_turn(p));
    }
    arm_qtimer(p);
}

static void fail_queue(struct vm_pool *p, const char *message)
{
    struct vm_call *c;
    while ((c = TAILQ_FIRST(&p->queue))) {
        unqueue(p, c);
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, message);
    }
    arm_qtimer(p);
}

static void unavailable_message(struct vm_pool *p, char *buf, size_t len)
{
    char ep[300];
    snprintf(buf, len, "internal error: virtmux cannot reach upstream %s (%s): %s", p->up->name,
             uri_endpoint(&p->up->uri, ep, sizeof(ep)), p->last_error);
}

void pool_submit(struct vm_pool *p, struct vm_link *home, struct vm_call *c)
{
    int paused = p->op == VM_UP_PAUSED;
    if (!paused && TAILQ_EMPTY(&p->queue)) { /* never overtake calls that already wait */
        if (home && link_state(home) == VM_LINK_READY && link_has_room(home)) {
            link_send(home, c);
            return;
        }
        struct vm_link *l = least_loaded_ready(p, 1);
        if (l) {
            link_send(l, c);
            return;
        }
    }
    int can_grow = p->nlinks < p->up->pool.max_connections;
    if (!least_loaded_ready(p, 0) && !any_connecting(p) && !can_grow && !holding(p)) {
        char msg[600];
        unavailable_message(p, msg, sizeof(msg));
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
        return;
    }
    if (!paused && least_loaded_ready(p, 0) && !can_grow)
        metrics_limit(p->env->metrics, VM_LIMIT_MAX_INFLIGHT); /* every connection is busy */
    enqueue(p, c);
    /* Held for a reconnect: the links backing off retry on their own timers; a new link per
     * held call would only knock on a closed door. */
    if (!paused && !any_connecting(p) && can_grow && !(held(p) && any_retrying(p)))
        add_link(p);
}

/* ---- stream slots ---- */

static void arm_stimer(struct vm_pool *p)
{
    struct vm_slot_wait *head = TAILQ_FIRST(&p->swait);
    arm_for(p, p->stimer, head ? &head->deadline : NULL);
}

int pool_stream_acquire(struct vm_pool *p, struct vm_slot_wait *w)
{
    if (p->op != VM_UP_PAUSED && p->nstreams < p->up->pool.max_streams &&
        TAILQ_EMPTY(&p->swait)) {
        p->nstreams++;
        return 1;
    }
    if (p->op != VM_UP_PAUSED)
        metrics_limit(p->env->metrics, VM_LIMIT_MAX_STREAMS);
    set_deadline(p, &w->deadline);
    if (p->op == VM_UP_PAUSED) { /* a new stream is a client call too: held like one */
        struct timeval now, add = {hold_ms(p) / 1000, (hold_ms(p) % 1000) * 1000}, t;
        event_base_gettimeofday_cached(p->env->base, &now);
        evutil_timeradd(&now, &add, &t);
        if (evutil_timercmp(&t, &w->deadline, <))
            w->deadline = t;
    }
    TAILQ_INSERT_TAIL(&p->swait, w, entry);
    p->nswait++;
    vm_info(p->tag, "max_streams (%d) open: stream waits (%d waiting)", p->up->pool.max_streams,
            p->nswait);
    arm_stimer(p);
    return 0;
}

void pool_stream_cancel(struct vm_pool *p, struct vm_slot_wait *w)
{
    TAILQ_REMOVE(&p->swait, w, entry);
    p->nswait--;
    arm_stimer(p);
    p->ops->maybe_empty(p->owner, p);
}

/* Give free stream slots to the streams waiting for one, in order. */
static void grant_streams(struct vm_pool *p)
{
    struct vm_slot_wait *w;
    while (p->op != VM_UP_PAUSED && p->nstreams < p->up->pool.max_streams &&
           (w = TAILQ_FIRST(&p->swait))) {
        TAILQ_REMOVE(&p->swait, w, entry);
        p->nswait--;
        p->nstreams++;
        w->granted(w);
    }
    arm_stimer(p);
}

void pool_stream_release(struct vm_pool *p)
{
    p->nstreams--;
    grant_streams(p);
    p->ops->maybe_empty(p->owner, p);
}

static void stream_wait_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct vm_pool *p = arg;
    struct timeval now;
    event_base_gettimeofday_cached(p->env->base, &now);
    struct vm_slot_wait *w;
    while ((w = TAILQ_FIRST(&p->swait)) && !evutil_timercmp(&now, &w->deadline, <)) {
        TAILQ_REMOVE(&p->swait, w, entry);
        p->nswait--;
        char msg[400];
        if (p->op == VM_UP_PAUSED)
            snprintf(msg, sizeof(msg), "operation timed out: virtmux upstream %s is paused for "
                     "maintenance", p->up->name);
        else
            snprintf(msg, sizeof(msg), "operation timed out: virtmux waited %d ms for one of the "
                     "%d stream connections to upstream %s (pool.max_streams)",
                     p->env->cfg->queue_timeout_ms, p->up->pool.max_streams, p->up->name);
        vm_warn(p->tag, "stream waited too long for a slot (%d still waiting)", p->nswait);
        metrics_limit(p->env->metrics, VM_LIMIT_STREAM_QUEUE_TIMEOUT);
        metrics_error(p->env->metrics, VM_ERRK_TIMEOUT);
        w->expired(w, msg);
    }
    arm_stimer(p);
    p->ops->maybe_empty(p->owner, p);
}

void pool_cancel_call(struct vm_pool *p, struct vm_call *c)
{
    unqueue(p, c);
    arm_qtimer(p);
}

struct vm_link *pool_rehome(struct vm_pool *p, struct vm_link *old)
{
    struct vm_link *l = least_referenced_ready(p);
    if (!l || l == old)
        return NULL;
    link_ref(l);
    return l;
}

void pool_release(struct vm_pool *p, struct vm_link *home)
{
    link_unref(home);
}

/* ---- libvirtd's refusal of the name ---- */

static void forget_refusal(struct vm_pool *p)
{
    if (!p->refusal)
        return;
    free(p->refusal);
    p->refusal = NULL;
    p->nrefusal = 0;
    evtimer_del(p->rtimer);
}

static void refusal_expired(evutil_socket_t fd, short what, void *arg)
{
    struct vm_pool *p = arg;
    forget_refusal(p);
    p->ops->maybe_empty(p->owner, p);
}

/* Keep libvirtd's refusal for VM_REFUSAL_CACHE_MS: OPENs of the name get it without a new
 * upstream connection each (the pool lives on meanwhile). */
static void remember_refusal(struct vm_pool *p, const void *payload, size_t n, const char *message)
{
    free(p->refusal);
    p->refusal = vm_calloc(1, n ? n : 1);
    memcpy(p->refusal, payload, n);
    p->nrefusal = n;
    snprintf(p->refusal_msg, sizeof(p->refusal_msg), "%s", message);
    struct timeval tv = {VM_REFUSAL_CACHE_MS / 1000, (VM_REFUSAL_CACHE_MS % 1000) * 1000};
    evtimer_add(p->rtimer, &tv);
}

/* ---- the operator ---- */

void pool_set_op(struct vm_pool *p, enum vm_upstream_op op)
{
    enum vm_upstream_op was = p->op;
    if (was == op)
        return;
    p->op = op;
    vm_info(p->tag, "upstream %s", pool_op_name(op));
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) /* retiring happens from the links' timers, later */
        link_set_draining(n->link, op == VM_UP_DRAINING);
    if (op == VM_UP_PAUSED) {
        hold_begin(p);
        return;
    }
    if (was != VM_UP_PAUSED)
        return;
    /* Resumed: what was held goes out in order; without a READY link the outage goes on. */
    if (least_loaded_ready(p, 0))
        hold_end(p);
    else if (!TAILQ_EMPTY(&p->queue) || !TAILQ_EMPTY(&p->swait))
        ensure_connecting(p);
    pump(p);
    grant_streams(p);
}

/* ---- link events ---- */

/* ---- what the links report (their ops) ---- */

static void on_link_ready(void *owner, struct vm_link *l)
{
    struct vm_pool *p = owner;
    p->last_error[0] = '\0'; /* reached: no error to report */
    forget_refusal(p);
    if (p->op != VM_UP_PAUSED)
        hold_end(p);
    metrics_upstream_error(p->env->metrics, p->mup, NULL);
    events_link_ready(p->events, l);
    while (p->nwaiters > 0) {
        struct vm_open_wait *w = p->waiters[0];
        pool_cancel_open(p, w);
        struct vm_link *home = least_referenced_ready(p);
        link_ref(home);
        w->done(w, home, NULL, 0, NULL);
    }
    arm_otimer(p);
    pump(p);
}

static void on_link_slot_free(void *owner, struct vm_link *l)
{
    pump(owner);
}

static void on_link_event(void *owner, struct vm_link *l, const struct vm_hdr *h,
                       struct evbuffer *pkt)
{
    struct vm_pool *p = owner;
    events_deliver(p->events, l, h, pkt);
}

/* The link lost its socket (or never got one). `err_payload` is the upstream's error when it
 * refused the open, else NULL; `message` is our own description. */
static void on_link_down(void *owner, struct vm_link *l, const void *err_payload, size_t n,
                      const char *message)
{
    struct vm_pool *p = owner;
    snprintf(p->last_error, sizeof(p->last_error), "%s", message);
    metrics_upstream_error(p->env->metrics, p->mup, message);
    events_link_down(p->events, l);
    cache_link_down(p->cache);
    if (any_connecting(p) || least_loaded_ready(p, 0))
        return; /* someone else may still serve the waiters and the queue */
    char msg[600];
    unavailable_message(p, msg, sizeof(msg));
    if (err_payload) {
        remember_refusal(p, err_payload, n, message);
    } else if (holding(p)) {
        /* libvirtd is away (restarting?) and a link keeps trying: queued and new calls, and
         * OPENs of new sessions, wait for it up to the hold. */
        hold_begin(p);
        hold_waiters(p);
        return;
    }
    fail_waiters(p, err_payload, n, err_payload ? message : msg);
    fail_queue(p, msg);
}

static void on_link_lost_for_good(void *owner, struct vm_link *l, const char *why)
{
    struct vm_pool *p = owner;
    p->ops->link_lost(p->owner, l, why);
}

/* The link is being freed (or retires) and leaves the pool. */
static void on_link_gone(void *owner, struct vm_link *l)
{
    struct vm_pool *p = owner;
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        if (n->link == l) {
            TAILQ_REMOVE(&p->links, n, entry);
            free(n);
            p->nlinks--;
            break;
        }
    }
    p->ops->maybe_empty(p->owner, p);
}

static const struct vm_link_ops pool_link_ops = {
    .ready = on_link_ready,
    .packet = on_link_event,
    .slot_free = on_link_slot_free,
    .down = on_link_down,
    .gone = on_link_gone,
    .lost_for_good = on_link_lost_for_good,
};

void pool_add_totals(const struct vm_pool *p, struct vm_pool_totals *t)
{
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry) {
        t->links++;
        t->link_refs += link_refs(n->link);
        t->inflight += link_inflight(n->link);
        t->internal += link_internal(n->link);
        t->by_state[link_state(n->link)]++;
    }
    t->queued += p->nqueued;
    t->opening += p->nwaiters;
    t->streams += p->nstreams;
    t->stream_waiting += p->nswait;
    t->event_registrations += events_registrations(p->events);
    t->event_subscribers += events_subscribers(p->events);
}

_Static_assert(sizeof(((struct vm_pool_totals *)0)->by_state) / sizeof(int) == VM_LINK_CLOSED + 1,
               "vm_pool_totals.by_state has one entry per link state");

const char *pool_last_error(const struct vm_pool *p)
{
    return p->last_error[0] ? p->last_error : NULL;
}

static const char *const link_states[] = {"connecting", "handshake", "ready",
                                          "backoff",    "retiring",  "closed"};

json_t *pool_status_json(const struct vm_pool *p)
{
    json_t *links = json_array();
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry)
        json_array_append_new(links, json_pack("{s:s, s:s, s:i, s:i}", "id", link_tag(n->link),
                                               "state", link_states[link_state(n->link)],
                                               "sessions", link_refs(n->link), "inflight",
                                               link_inflight(n->link)));
    return json_pack("{s:s, s:s, s:b, s:s, s:b, s:i, s:i, s:o, s:o, s:i, s:i, s:i, s:i}",
                     "upstream", p->up->name, "name", p->name, "readonly", p->readonly,
                     "operator", pool_op_name(p->op), "holding", held(p), "queued", p->nqueued,
                     "opening", p->nwaiters, "last_error",
                     p->last_error[0] ? json_string(p->last_error) : json_null(), "links", links,
                     "event_registrations", events_registrations(p->events),
                     "event_subscribers", events_subscribers(p->events),
                     "shared_calls", cache_inflight(p->cache),
                     "cache_entries", cache_entries(p->cache));
}

void pool_log_status(const struct vm_pool *p)
{
    const char *const *states = link_states;
    vm_info(p->tag, "status: %s%s, %d links, %d queued, %d opening", pool_op_name(p->op),
            held(p) ? " (holding calls)" : "", p->nlinks, p->nqueued, p->nwaiters);
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry)
        vm_info(link_tag(n->link), "status: %s, %d sessions, %d in flight",
                states[link_state(n->link)], link_refs(n->link), link_inflight(n->link));
}
