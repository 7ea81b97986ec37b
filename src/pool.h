/* A pool: the upstream connections for one (upstream, opened name, read-only) key, and the FIFO
 * of calls waiting for a free slot.
 *
 *    session ---home ref---> link ... link   (at most max_connections)
 *       \                     ^  each carries at most max_inflight calls
 *        `--pool_submit--> queue (FIFO, queue_timeout_ms) --pump-->'
 */
#ifndef VM_POOL_H
#define VM_POOL_H

#include <sys/queue.h>
#include <sys/time.h>

#include <jansson.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;
struct vm_events;

struct vm_env;
typedef struct ssl_ctx_st SSL_CTX;

/* How a pool reports to its owner (the gateway). */
struct vm_pool_ops {
    /* Something left the pool; if pool_is_empty() now, the owner may free it (later). */
    void (*maybe_empty)(void *owner, struct vm_pool *p);
    /* A link has not reconnected for pool.give_up_s: the sessions homed on it must hear. */
    void (*link_lost)(void *owner, struct vm_link *l, const char *why);
};

/* A session waiting for its CONNECT_OPEN. The pool calls `done` once: with the home link (a
 * reference is taken for the session) or with the failure: libvirtd's own error payload
 * (err, n) when it refused the name, else `message`. */
struct vm_open_wait {
    void (*done)(struct vm_open_wait *w, struct vm_link *home, const void *err, size_t n,
                 const char *message);
    struct timeval deadline; /* the pool's: a held open gives up then (cleared: not held) */
};

/* What an operator made of an upstream; every pool of that upstream follows it.
 *   ACTIVE    calls go out as usual
 *   PAUSED    client calls wait in the queue (up to pool.reconnect_hold_ms, and at most
 *             limits.queue_timeout_ms); nothing of a client's is sent until resume
 *   DRAINING  no new sessions (CONNECT_OPEN is refused); existing ones carry on; links close as
 *             soon as they are unused */
/* How long libvirtd's refusal of a name is replayed to new OPENs of it (a client retrying a
 * bad name must not make a new upstream connection each time). */
#define VM_REFUSAL_CACHE_MS 5000

enum vm_upstream_op { VM_UP_ACTIVE, VM_UP_PAUSED, VM_UP_DRAINING };
/* "active", "paused", "draining". */
const char *pool_op_name(enum vm_upstream_op op);

/* A pool for (up, name, readonly); `tls` is the client context for tls:// upstreams. */
struct vm_pool *pool_new(struct vm_env *env, const struct vm_pool_ops *ops, void *owner,
                         const struct vm_upstream_cfg *up, const char *name, int readonly,
                         SSL_CTX *tls);
void pool_free(struct vm_pool *p);
int pool_matches(const struct vm_pool *p, const struct vm_upstream_cfg *up, const char *name,
                 int readonly);
const char *pool_name(const struct vm_pool *p);
const struct vm_upstream_cfg *pool_upstream(const struct vm_pool *p);
int pool_readonly(const struct vm_pool *p);
struct vm_gateway *pool_gateway(const struct vm_pool *p);
/* Follow the upstream's operator state (the gateway tells every pool of the upstream, and
 * each new one). Resuming sends what was held, oldest first. */
void pool_set_op(struct vm_pool *p, enum vm_upstream_op op);
/* True when nothing refers to the pool any more (no links, waiters or queued calls) and no
 * refusal of its name is remembered. */
int pool_is_empty(const struct vm_pool *p);

/* Open a session on the pool; answers through w->done (maybe right away). A draining pool
 * refuses; a name libvirtd refused less than VM_REFUSAL_CACHE_MS ago gets the same refusal
 * without a new upstream connection. */
void pool_open(struct vm_pool *p, struct vm_open_wait *w);
/* The session went away while its open was pending. */
void pool_cancel_open(struct vm_pool *p, struct vm_open_wait *w);
/* Send a call, preferring `home`, spilling to another connection with room, growing the pool,
 * or queueing; while the pool reconnects or is paused it waits (pool.reconnect_hold_ms). The
 * call always ends in call_finish or call_fail. */
void pool_submit(struct vm_pool *p, struct vm_link *home, struct vm_call *c);
/* Remove a call still waiting in the queue (its client left). Does not free it. */
void pool_cancel_call(struct vm_pool *p, struct vm_call *c);
/* Another READY link than `old` for a session whose home is lost for good, with a reference
 * taken for it; NULL when there is none. */
struct vm_link *pool_rehome(struct vm_pool *p, struct vm_link *old);
/* A session drops its reference on its home link. */
void pool_release(struct vm_pool *p, struct vm_link *home);

/* A stream waiting for one of the pool's max_streams slots. The owner embeds it and is told
 * through its callbacks: `granted` when a slot is its own (it must pool_stream_release it
 * later), `expired` after limits.queue_timeout_ms (it is off the queue then). */
struct vm_slot_wait {
    void (*granted)(struct vm_slot_wait *w);
    void (*expired)(struct vm_slot_wait *w, const char *message);
    struct timeval deadline;
    TAILQ_ENTRY(vm_slot_wait) entry;
};
/* Take a stream slot: 1 when taken now, 0 when `w` was queued (answered by its callbacks). */
int pool_stream_acquire(struct vm_pool *p, struct vm_slot_wait *w) VM_WUR;
/* Remove a queued `w` (its stream ended before it got a slot). */
void pool_stream_cancel(struct vm_pool *p, struct vm_slot_wait *w);
/* A stream that held a slot ended: the next waiter gets it. */
void pool_stream_release(struct vm_pool *p);

/* Shutting down: retire (CONNECT_CLOSE, freed on libvirtd's reply) every link nobody uses and
 * that has nothing in flight, the gateway's own calls included. Returns how many links are
 * still busy (the caller asks again later). */
int pool_retire_idle(struct vm_pool *p);

/* The pool's event fan-out state. */
struct vm_events *pool_events(const struct vm_pool *p);
/* The pool's coalescing and micro-cache state (cache.h); NULL when both are off. */
struct vm_cache;
struct vm_cache *pool_cache(const struct vm_pool *p);

/* Parameters for a new link to this pool's upstream, name and read-only flag (a stream's
 * dedicated link uses them too). The result points into the pool and the config. */
struct vm_link_params;
void pool_link_params(struct vm_pool *p, struct vm_link_params *lp);

/* Running totals over pools, for the admin status (each field is added to). */
struct vm_pool_totals {
    int links, link_refs, inflight, internal, queued, opening;
    int streams, stream_waiting;         /* stream slots taken, streams waiting for one */
    int event_registrations, event_subscribers;
    int by_state[6];                     /* links per enum vm_link_state */
};
void pool_add_totals(const struct vm_pool *p, struct vm_pool_totals *t);
/* The last connection failure of the pool's upstream, or NULL while it is reached. */
const char *pool_last_error(const struct vm_pool *p);
/* The pool and its links as JSON (admin status); caller owns it. */
json_t *pool_status_json(const struct vm_pool *p);

/* Append a status summary of the pool and its links to the log. */
void pool_log_status(const struct vm_pool *p);

#endif
