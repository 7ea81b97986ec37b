/*
 * Coalescing and the micro-cache of one pool (see cache.h for the contract).
 *
 *   flights (hash, ≤ MAX_FLIGHTS)          stored (hash + FIFO by age, ≤ max_entries/bytes)
 *   ┌───────────────────────────┐          ┌────────────────────────────────┐
 *   │ key ─> shared vm_call     │ reply ─> │ key ─> reply bytes, expiry     │
 *   │        parked callers ... │          └────────────────────────────────┘
 *   └───────────────────────────┘
 *
 * `gen` counts invalidations: a shared call remembers the generation it was sent in and its
 * reply is stored only if nothing invalidated the cache since (and the lifecycle subscription
 * was active all along), so a reply that may predate a change is never kept.
 *
 * The lifecycle subscription is a vm_peer of the cache's own: events.c answers it in `out`
 * and pushes each event through push_event, which invalidates. It is made on the first
 * cacheable call and dropped after the pool's idle_timeout_s without one, so an unused pool
 * can still go idle.
 */
#include "cache.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "call.h"
#include "config.h"
#include "env.h"
#include "events.h"
#include "log.h"
#include "metrics.h"
#include "peer.h"
#include "proc.h"
#include "util.h"
#include "wire.h"

#define MAX_FLIGHTS 1024     /* shared calls in flight per pool; more go on their own */
#define FLIGHT_BUCKETS 256
#define SUB_RETRY_NS 1000000000ull /* after a refused registration, wait this long */

enum sub_state { SUB_NONE, SUB_PENDING, SUB_ACTIVE };

struct key {
    uint64_t hash;
    uint32_t prog;
    int32_t proc;
    uint8_t *args;           /* owned */
    size_t nargs;
};

struct flight {
    struct vm_cache *k;      /* NULL once the cache is gone */
    struct key key;
    struct vm_call_list parked; /* the callers, through qentry; owned by their sessions */
    unsigned gen;            /* the cache's generation when sent */
    int cacheable;           /* store the reply if still valid */
    int joinable;            /* in the flight table */
    struct flight *hnext;
    LIST_ENTRY(flight) live; /* every flight not yet ended */
};

struct stored {
    struct key key;
    uint8_t *reply;          /* owned: the whole reply packet */
    size_t nreply;
    uint64_t expires_ns;
    struct stored *hnext;
    TAILQ_ENTRY(stored) age; /* oldest first: with one ttl that is also expiry order */
};

struct vm_cache {
    struct vm_env *env;                 /* not owned */
    const struct vm_upstream_cfg *up;   /* not owned (config snapshot) */
    const struct vm_cache_cfg *cfg;     /* the upstream's; NULL: coalescing only */
    int coalesce;
    struct vm_events *ev;               /* not owned: the pool's; NULL after shutdown */
    int mup;
    unsigned gen;
    struct flight *flights[FLIGHT_BUCKETS];
    int nflights;                       /* joinable ones */
    int nlive;                          /* every flight not yet ended (status) */
    LIST_HEAD(, flight) live;
    struct stored **buckets;            /* owned; nbuckets a power of two */
    size_t nbuckets;
    TAILQ_HEAD(, stored) by_age;
    int nstored;
    size_t bytes;
    /* The lifecycle subscription. */
    struct vm_peer peer;
    struct evbuffer *out;               /* owned: what events.c answers the peer */
    enum sub_state sub;
    uint64_t sub_retry_ns;              /* no new registration before this */
    int used;                           /* a cacheable call since the idle timer last fired */
    struct event *idle;                 /* owned */
    struct event *later;                /* owned: drops the subscription after a link loss */
    char tag[200];
};

static void unsubscribe(struct vm_cache *k);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* FNV-1a over the program, procedure and arguments. */
static uint64_t hash_of(uint32_t prog, int32_t proc, const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    uint32_t words[2] = {prog, (uint32_t)proc};
    const uint8_t *w = (const uint8_t *)words;
    for (size_t i = 0; i < sizeof(words); i++)
        h = (h ^ w[i]) * 1099511628211ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static int key_eq(const struct key *a, uint64_t hash, uint32_t prog, int32_t proc,
                  const uint8_t *args, size_t n)
{
    return a->hash == hash && a->prog == prog && a->proc == proc && a->nargs == n &&
           memcmp(a->args, args, n) == 0;
}

/* ---- the lifecycle subscription (a peer of events.c) ---- */

static struct vm_cache *of_peer(struct vm_peer *p)
{
    return (struct vm_cache *)((char *)p - offsetof(struct vm_cache, peer));
}

static struct evbuffer *peer_output(struct vm_peer *p)
{
    return of_peer(p)->out;
}

static int peer_push_event(struct vm_peer *p, const void *pkt, size_t len)
{
    (void)pkt;
    (void)len;
    cache_invalidate(of_peer(p), VM_CACHE_INVALIDATED_EVENT);
    return 0;
}

static int peer_output_full(struct vm_peer *p)
{
    (void)p;
    return 0;
}

static void peer_nop_block(struct vm_peer *p, int on)
{
    (void)p;
    (void)on;
}

static void peer_nop(struct vm_peer *p)
{
    (void)p;
}

static void peer_close(struct vm_peer *p, const char *why)
{
    struct vm_cache *k = of_peer(p);
    vm_info(k->tag, "cache lifecycle subscription dropped: %s", why);
    unsubscribe(k);
}

static const struct vm_peer_ops cache_peer_ops = {
    .output = peer_output,
    .push_event = peer_push_event,
    .output_full = peer_output_full,
    .block_reading = peer_nop_block,
    .request_begin = peer_nop,
    .request_end = peer_nop,
    .close = peer_close,
};

/* events.c answered the registration: OK makes it active (and starts a new generation, so
 * replies of calls sent before it are not stored); an error leaves it off for a while. */
static void out_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    struct vm_cache *k = arg;
    if (info->n_added == 0)
        return;
    uint32_t len;
    while (wire_frame_ready(buf, &len) == 1) {
        struct vm_hdr h;
        wire_hdr_peek(buf, &h);
        evbuffer_drain(buf, len);
        if (h.type != VM_REPLY || k->sub != SUB_PENDING)
            continue;
        if (h.status == VM_STATUS_OK) {
            k->sub = SUB_ACTIVE;
            k->gen++;
            vm_debug(k->tag, "cache: lifecycle subscription active");
        } else {
            k->sub = SUB_NONE; /* events.c has removed the subscriber */
            k->sub_retry_ns = now_ns() + SUB_RETRY_NS;
            vm_info(k->tag, "cache: lifecycle registration refused; nothing is stored");
        }
    }
    if (wire_frame_ready(buf, &len) < 0)
        evbuffer_drain(buf, evbuffer_get_length(buf));
}

static void subscribe(struct vm_cache *k)
{
    if (k->sub != SUB_NONE || !k->ev || now_ns() < k->sub_retry_ns)
        return;
    /* CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY {int eventID = LIFECYCLE (0); remote_domain
     * dom = NULL (every domain)}: the same bytes a client sends, so the registration is
     * shared with clients watching every domain's lifecycle. */
    static const uint8_t args[8] = {0};
    struct vm_hdr h = {.len = VM_HDR_LEN + sizeof(args), .prog = VM_PROG_REMOTE,
                       .vers = VM_PROG_VERSION,
                       .proc = VM_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
                       .type = VM_CALL, .serial = 0, .status = VM_STATUS_OK};
    k->sub = SUB_PENDING;
    events_subscribe(k->ev, &k->peer, &h, args, sizeof(args));
}

static void drop_all(struct vm_cache *k);

/* Without the subscription nothing stored can be trusted: it all goes. */
static void unsubscribe(struct vm_cache *k)
{
    if (k->sub == SUB_NONE)
        return;
    k->sub = SUB_NONE;
    k->gen++;
    drop_all(k);
    if (k->ev)
        events_peer_gone(k->ev, &k->peer);
}

static void later_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct vm_cache *k = arg;
    k->sub = SUB_PENDING; /* whatever it became meanwhile: drop it and start again */
    unsubscribe(k);
}

/* No cacheable call for idle_timeout_s: let the registration (and with it the pool) go. */
static void idle_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct vm_cache *k = arg;
    if (!k->used && k->sub != SUB_NONE) {
        vm_debug(k->tag, "cache: unused, lifecycle subscription dropped");
        unsubscribe(k);
    }
    k->used = 0;
}

/* ---- stored replies ---- */

static void stored_unlink(struct vm_cache *k, struct stored *e)
{
    struct stored **pp = &k->buckets[e->key.hash & (k->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    TAILQ_REMOVE(&k->by_age, e, age);
    k->nstored--;
    k->bytes -= e->nreply;
    free(e->key.args);
    free(e->reply);
    free(e);
}

static void drop_all(struct vm_cache *k)
{
    struct stored *e;
    while ((e = TAILQ_FIRST(&k->by_age)))
        stored_unlink(k, e);
}

static void drop_expired(struct vm_cache *k, uint64_t now)
{
    struct stored *e;
    while ((e = TAILQ_FIRST(&k->by_age)) && e->expires_ns <= now)
        stored_unlink(k, e);
}

static struct stored *stored_find(struct vm_cache *k, uint64_t hash, uint32_t prog, int32_t proc,
                                  const uint8_t *args, size_t n)
{
    if (!k->buckets)
        return NULL;
    for (struct stored *e = k->buckets[hash & (k->nbuckets - 1)]; e; e = e->hnext)
        if (key_eq(&e->key, hash, prog, proc, args, n))
            return e;
    return NULL;
}

static void store(struct vm_cache *k, struct key *key, struct evbuffer *pkt)
{
    size_t n = evbuffer_get_length(pkt);
    if (n > (size_t)k->cfg->max_bytes)
        return;
    uint64_t now = now_ns();
    drop_expired(k, now);
    struct stored *old = stored_find(k, key->hash, key->prog, key->proc, key->args, key->nargs);
    if (old)
        stored_unlink(k, old);
    while (k->nstored >= k->cfg->max_entries || k->bytes + n > (size_t)k->cfg->max_bytes)
        stored_unlink(k, TAILQ_FIRST(&k->by_age));
    struct stored *e = vm_calloc(1, sizeof(*e));
    e->key = *key; /* the flight's key moves here */
    key->args = NULL;
    e->reply = malloc(n);
    if (!e->reply)
        abort();
    evbuffer_copyout(pkt, e->reply, n);
    e->nreply = n;
    e->expires_ns = now + (uint64_t)k->cfg->ttl_ms * 1000000ull;
    struct stored **b = &k->buckets[key->hash & (k->nbuckets - 1)];
    e->hnext = *b;
    *b = e;
    TAILQ_INSERT_TAIL(&k->by_age, e, age);
    k->nstored++;
    k->bytes += n;
}

/* ---- shared calls ---- */

static void flight_unjoin(struct vm_cache *k, struct flight *f)
{
    if (!f->joinable)
        return;
    struct flight **pp = &k->flights[f->key.hash % FLIGHT_BUCKETS];
    while (*pp != f)
        pp = &(*pp)->hnext;
    *pp = f->hnext;
    f->joinable = 0;
    k->nflights--;
}

/* The shared call ended: store the reply if nothing changed meanwhile, then hand every parked
 * caller a copy (or the error). A caller's callback may close its session, which swallows
 * that session's other parked calls: they stay here and are freed as they are ended. */
static void flight_done(void *arg, struct vm_call *up, const struct vm_hdr *reply,
                        struct evbuffer *pkt, const struct vm_call_error *err)
{
    (void)up;
    struct flight *f = arg;
    struct vm_cache *k = f->k;
    if (k) {
        flight_unjoin(k, f);
        LIST_REMOVE(f, live);
        k->nlive--;
        if (reply && reply->status == VM_STATUS_OK && f->cacheable && k->cfg &&
            k->sub == SUB_ACTIVE && f->gen == k->gen)
            store(k, &f->key, pkt);
    }
    const uint8_t *raw = reply ? evbuffer_pullup(pkt, -1) : NULL;
    size_t n = reply ? evbuffer_get_length(pkt) : 0;
    struct evbuffer *copy = reply ? evbuffer_new() : NULL;
    if (reply && !copy)
        abort();
    struct vm_call *c;
    while ((c = TAILQ_FIRST(&f->parked))) {
        TAILQ_REMOVE(&f->parked, c, qentry);
        c->parked = 0;
        if (reply) {
            evbuffer_add(copy, raw, n);
            call_finish(c, copy);
            evbuffer_drain(copy, evbuffer_get_length(copy));
        } else {
            call_fail(c, err->code, err->domain, err->message);
        }
    }
    if (copy)
        evbuffer_free(copy);
    free(f->key.args);
    free(f);
}

static void park(struct flight *f, struct vm_call *c)
{
    c->parked = 1;
    TAILQ_INSERT_TAIL(&f->parked, c, qentry);
}

/* ---- the API ---- */

struct vm_cache *cache_new(struct vm_env *env, const struct vm_upstream_cfg *up, int readonly,
                           struct vm_events *ev, int mup)
{
    int caching = up->cache.enabled && (readonly || up->cache.readwrite);
    if (!caching && !up->pool.coalesce)
        return NULL;
    struct vm_cache *k = vm_calloc(1, sizeof(*k));
    k->env = env;
    k->up = up;
    k->cfg = caching ? &up->cache : NULL;
    k->coalesce = up->pool.coalesce;
    k->ev = ev;
    k->mup = mup;
    TAILQ_INIT(&k->by_age);
    LIST_INIT(&k->live);
    snprintf(k->tag, sizeof(k->tag), "P:%s%s", up->name, readonly ? " ro" : "");
    if (caching) {
        k->nbuckets = 16;
        while (k->nbuckets < (size_t)up->cache.max_entries && k->nbuckets < 65536)
            k->nbuckets <<= 1;
        k->buckets = vm_calloc(k->nbuckets, sizeof(*k->buckets));
        k->out = evbuffer_new();
        k->idle = event_new(env->base, -1, EV_PERSIST, idle_cb, k);
        k->later = event_new(env->base, -1, 0, later_cb, k);
        if (!k->out || !k->idle || !k->later)
            abort();
        evbuffer_add_cb(k->out, out_cb, k);
        int s = up->pool.idle_timeout_s > 0 ? up->pool.idle_timeout_s : 1;
        struct timeval tv = {s, 0};
        event_add(k->idle, &tv);
        k->peer.ops = &cache_peer_ops;
        k->peer.tag = k->tag;
        TAILQ_INIT(&k->peer.subs);
        TAILQ_INIT(&k->peer.streams);
        k->peer.next_cb_id = 1;
    }
    return k;
}

void cache_shutdown(struct vm_cache *k)
{
    if (!k)
        return;
    /* events_free unlinks the subscription from our peer; nothing is sent any more. */
    k->ev = NULL;
    k->sub = SUB_NONE;
}

void cache_free(struct vm_cache *k)
{
    if (!k)
        return;
    cache_shutdown(k);
    struct flight *f;
    while ((f = LIST_FIRST(&k->live))) {
        LIST_REMOVE(f, live);
        f->k = NULL; /* it still ends, and hands its callers their reply, on its own */
    }
    drop_all(k);
    free(k->buckets);
    if (k->idle)
        event_free(k->idle);
    if (k->later)
        event_free(k->later);
    if (k->out)
        evbuffer_free(k->out);
    free(k);
}

/* Plain calls of read-only verdict "yes" only: nothing that changes state, streams, events
 * or passes descriptors. */
static int shareable(const struct vm_proc_info *info)
{
    return info && info->ro == VM_RO_YES && info->kind == VM_PK_CALL && !info->fds_in &&
           !info->fds_out;
}

static int cacheable_proc(const struct vm_cache *k, const struct vm_proc_info *info)
{
    if (!k->cfg)
        return 0;
    for (int i = 0; i < k->cfg->nprocs; i++)
        if (k->cfg->procs[i] == info)
            return 1;
    return 0;
}

struct vm_call *cache_call(struct vm_cache *k, struct vm_call *c)
{
    if (!k)
        return c;
    size_t len = evbuffer_get_length(c->pkt);
    if (len < VM_HDR_LEN)
        return c;
    /* What goes upstream decides, not what the client asked: a grant may have rewritten
     * the call (LIST_DOMAINS -> LIST_ALL_DOMAINS) and the reply answers the rewritten one. */
    struct vm_hdr h;
    wire_hdr_peek(c->pkt, &h);
    const struct vm_proc_info *info = vm_proc_lookup(h.prog, h.proc);
    if (!info || !shareable(info) || !shareable(vm_proc_lookup(c->hdr.prog, c->hdr.proc)))
        return c;
    int cacheable = cacheable_proc(k, info);
    if (!cacheable && !k->coalesce)
        return c;
    const uint8_t *args = evbuffer_pullup(c->pkt, -1) + VM_HDR_LEN;
    size_t n = len - VM_HDR_LEN;
    uint64_t hash = hash_of(h.prog, h.proc, args, n);

    if (cacheable) {
        k->used = 1;
        uint64_t now = now_ns();
        drop_expired(k, now);
        struct stored *e = stored_find(k, hash, h.prog, h.proc, args, n);
        if (e && k->sub == SUB_ACTIVE) {
            metrics_cache(k->env->metrics, k->mup, VM_CACHE_HIT);
            struct evbuffer *buf = evbuffer_new();
            if (!buf)
                abort();
            evbuffer_add(buf, e->reply, e->nreply);
            call_finish(c, buf);
            evbuffer_free(buf);
            return NULL;
        }
        metrics_cache(k->env->metrics, k->mup, VM_CACHE_MISS);
        subscribe(k);
    }
    if (k->coalesce) {
        for (struct flight *f = k->flights[hash % FLIGHT_BUCKETS]; f; f = f->hnext) {
            if (key_eq(&f->key, hash, h.prog, h.proc, args, n)) {
                metrics_cache(k->env->metrics, k->mup, VM_CACHE_COALESCED);
                park(f, c);
                return NULL;
            }
        }
    }
    if (k->nflights >= MAX_FLIGHTS)
        return c; /* bounded: beyond this, calls go on their own */

    struct flight *f = vm_calloc(1, sizeof(*f));
    f->k = k;
    f->key.hash = hash;
    f->key.prog = h.prog;
    f->key.proc = h.proc;
    f->key.nargs = n;
    f->key.args = malloc(n ? n : 1);
    if (!f->key.args)
        abort();
    memcpy(f->key.args, args, n);
    f->gen = k->gen;
    f->cacheable = cacheable;
    TAILQ_INIT(&f->parked);
    if (k->coalesce) {
        struct flight **b = &k->flights[hash % FLIGHT_BUCKETS];
        f->hnext = *b;
        *b = f;
        f->joinable = 1;
        k->nflights++;
    }
    LIST_INSERT_HEAD(&k->live, f, live);
    k->nlive++;
    struct vm_call *up = call_new(flight_done, f, 0);
    up->hdr = h;
    up->t0_ns = c->t0_ns;
    evbuffer_add_buffer(up->pkt, c->pkt); /* the packet moves; c keeps its header */
    park(f, c);
    return up;
}

void cache_invalidate(struct vm_cache *k, enum vm_cache_stat why)
{
    if (!k)
        return;
    for (int b = 0; b < FLIGHT_BUCKETS; b++)
        while (k->flights[b])
            flight_unjoin(k, k->flights[b]);
    if (!k->cfg)
        return;
    k->gen++;
    metrics_cache(k->env->metrics, k->mup, why);
    if (k->nstored)
        vm_debug(k->tag, "cache: %d entries dropped", k->nstored);
    drop_all(k);
}

void cache_link_down(struct vm_cache *k)
{
    if (!k || !k->cfg)
        return;
    cache_invalidate(k, VM_CACHE_INVALIDATED_LINK);
    if (k->sub == SUB_NONE)
        return;
    /* events.c re-registers on its own, without telling the cache when it is active again,
     * and events are lost meanwhile: hold off (no hits, nothing stored) and, after this loop
     * turn (the link is being torn down right now), drop the subscription to make it anew. */
    k->sub = SUB_PENDING;
    event_active(k->later, 0, 0);
}

int cache_entries(const struct vm_cache *k)
{
    return k ? k->nstored : 0;
}

int cache_inflight(const struct vm_cache *k)
{
    return k ? k->nlive : 0;
}
