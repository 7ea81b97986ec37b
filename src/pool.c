/*
 * Pools: which upstream connection carries a call.
 *
 *   pool_submit(call, home)
 *     home READY with room ............ send on home
 *     another READY link with room .... spill (every forwarded call is stateless per socket)
 *     fewer than max_connections ...... open a new link, queue the call
 *     a link is (re)connecting ........ queue the call (queue_timeout_ms)
 *     nothing can carry it ............ fail it now with the last connection error
 *
 * A slot freeing up or a link becoming READY pumps the queue: owners (sessions) with waiting
 * calls take turns, one call each, and each owner's calls leave in their own order; a deep
 * pipeline from one client only delays that client. The queue timer fails calls in arrival
 * order once they waited queue_timeout_ms.
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
    int mup;                            /* metrics slot of the upstream */
};

static void queue_timeout(evutil_socket_t fd, short what, void *arg);
static void unqueue(struct vm_pool *p, struct vm_call *c);
static const struct vm_link_ops pool_link_ops;
static void stream_wait_timeout(evutil_socket_t fd, short what, void *arg);
static struct vm_link *least_referenced_ready(struct vm_pool *p);

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
    TAILQ_INIT(&p->swait);
    if (!p->name || !p->qtimer || !p->stimer)
        abort();
    snprintf(p->last_error, sizeof(p->last_error), "not connected yet");
    p->mup = metrics_upstream(env->metrics, up->name);
    p->events = events_new(env, up->name, ready_link_for_events, p);
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
           p->nswait == 0 && !events_busy(p->events);
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

static void add_link(struct vm_pool *p)
{
    struct link_node *n = vm_calloc(1, sizeof(*n));
    TAILQ_INSERT_TAIL(&p->links, n, entry);
    p->nlinks++;
    struct vm_link_params lp;
    pool_link_params(p, &lp);
    n->link = link_new(&lp, &pool_link_ops, p);
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
    struct vm_link *l = least_referenced_ready(p);
    if (l) {
        link_ref(l);
        w->done(w, l, NULL, 0, NULL);
        return;
    }
    if (p->nwaiters == p->capwaiters) {
        p->capwaiters = p->capwaiters ? p->capwaiters * 2 : 8;
        p->waiters = realloc(p->waiters, (size_t)p->capwaiters * sizeof(*p->waiters));
        if (!p->waiters)
            abort();
    }
    p->waiters[p->nwaiters++] = w;
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

/* Answer every waiting OPEN with a failure. */
static void fail_waiters(struct vm_pool *p, const void *err_payload, size_t n, const char *message)
{
    while (p->nwaiters > 0) {
        struct vm_open_wait *w = p->waiters[0];
        pool_cancel_open(p, w);
        w->done(w, NULL, err_payload, n, message);
    }
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

static void arm_qtimer(struct vm_pool *p)
{
    struct vm_call *head = TAILQ_FIRST(&p->queue);
    arm_for(p, p->qtimer, head ? &head->deadline : NULL);
}

static void enqueue(struct vm_pool *p, struct vm_call *c)
{
    set_deadline(p, &c->deadline);
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
    while ((c = TAILQ_FIRST(&p->queue)) && !evutil_timercmp(&now, &c->deadline, <)) {
        unqueue(p, c);
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
    while (!TAILQ_EMPTY(&p->queue)) {
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
    if (TAILQ_EMPTY(&p->queue)) { /* never overtake calls that already wait */
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
    if (!least_loaded_ready(p, 0) && !any_connecting(p) && !can_grow) {
        char msg[600];
        unavailable_message(p, msg, sizeof(msg));
        call_fail(c, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
        return;
    }
    if (least_loaded_ready(p, 0) && !can_grow)
        metrics_limit(p->env->metrics, VM_LIMIT_MAX_INFLIGHT); /* every connection is busy */
    enqueue(p, c);
    if (!any_connecting(p) && can_grow)
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
    if (p->nstreams < p->up->pool.max_streams && TAILQ_EMPTY(&p->swait)) {
        p->nstreams++;
        return 1;
    }
    metrics_limit(p->env->metrics, VM_LIMIT_MAX_STREAMS);
    set_deadline(p, &w->deadline);
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

void pool_stream_release(struct vm_pool *p)
{
    p->nstreams--;
    struct vm_slot_wait *w;
    while (p->nstreams < p->up->pool.max_streams && (w = TAILQ_FIRST(&p->swait))) {
        TAILQ_REMOVE(&p->swait, w, entry);
        p->nswait--;
        p->nstreams++;
        w->granted(w);
    }
    arm_stimer(p);
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
        snprintf(msg, sizeof(msg), "operation timed out: virtmux waited %d ms for one of the %d "
                 "stream connections to upstream %s (pool.max_streams)",
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

void pool_release(struct vm_pool *p, struct vm_link *home)
{
    link_unref(home);
}

/* ---- link events ---- */

/* ---- what the links report (their ops) ---- */

static void on_link_ready(void *owner, struct vm_link *l)
{
    struct vm_pool *p = owner;
    p->last_error[0] = '\0'; /* reached: no error to report */
    metrics_upstream_error(p->env->metrics, p->mup, NULL);
    events_link_ready(p->events, l);
    while (p->nwaiters > 0) {
        struct vm_open_wait *w = p->waiters[0];
        pool_cancel_open(p, w);
        struct vm_link *home = least_referenced_ready(p);
        link_ref(home);
        w->done(w, home, NULL, 0, NULL);
    }
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
    return json_pack("{s:s, s:s, s:b, s:i, s:i, s:o, s:o, s:i, s:i}", "upstream", p->up->name,
                     "name", p->name, "readonly", p->readonly, "queued", p->nqueued, "opening",
                     p->nwaiters, "last_error",
                     p->last_error[0] ? json_string(p->last_error) : json_null(), "links", links,
                     "event_registrations", events_registrations(p->events),
                     "event_subscribers", events_subscribers(p->events));
}

void pool_log_status(const struct vm_pool *p)
{
    const char *const *states = link_states;
    vm_info(p->tag, "status: %d links, %d queued, %d opening", p->nlinks, p->nqueued, p->nwaiters);
    struct link_node *n;
    TAILQ_FOREACH(n, &p->links, entry)
        vm_info(link_tag(n->link), "status: %s, %d sessions, %d in flight",
                states[link_state(n->link)], link_refs(n->link), link_inflight(n->link));
}
