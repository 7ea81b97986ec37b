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

struct vm_pool *pool_new(struct vm_gateway *gw, const struct vm_upstream_cfg *up,
                         const char *name, int readonly);
void pool_free(struct vm_pool *p);
int pool_matches(const struct vm_pool *p, const struct vm_upstream_cfg *up, const char *name,
                 int readonly);
const char *pool_name(const struct vm_pool *p);
const struct vm_upstream_cfg *pool_upstream(const struct vm_pool *p);
int pool_readonly(const struct vm_pool *p);
struct vm_gateway *pool_gateway(const struct vm_pool *p);
/* True when nothing refers to the pool any more (no links, waiters or queued calls). */
int pool_is_empty(const struct vm_pool *p);

/* Open a session on the pool; answers later through session_open_done (maybe right away). */
void pool_open(struct vm_pool *p, struct vm_session *s);
/* The session went away while its open was pending. */
void pool_cancel_open(struct vm_pool *p, struct vm_session *s);
/* Send a call, preferring `home`, spilling to another connection with room, growing the pool,
 * or queueing. The call always ends in call_finish or call_fail. */
void pool_submit(struct vm_pool *p, struct vm_link *home, struct vm_call *c);
/* Remove a call still waiting in the queue (its client left). Does not free it. */
void pool_cancel_call(struct vm_pool *p, struct vm_call *c);
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

/* The pool's event fan-out state. */
struct vm_events *pool_events(const struct vm_pool *p);
/* A READY link (the least referenced), or NULL. */
struct vm_link *pool_ready_link(struct vm_pool *p);

/* Events from links. */
void pool_link_event(struct vm_pool *p, struct vm_link *l, const struct vm_hdr *h,
                     struct evbuffer *pkt);
void pool_link_ready(struct vm_pool *p, struct vm_link *l);
void pool_link_slot_free(struct vm_pool *p, struct vm_link *l);
/* The link lost its socket (or never got one). `err_payload` is the upstream's error when it
 * refused the open, else NULL; `message` is our own description. */
void pool_link_down(struct vm_pool *p, struct vm_link *l, const void *err_payload, size_t n,
                    const char *message);
/* The link is being freed and leaves the pool. */
void pool_link_gone(struct vm_pool *p, struct vm_link *l);

/* Running totals over pools, for the admin status (each field is added to). */
struct vm_pool_totals {
    int links, link_refs, inflight, internal, queued, opening;
};
void pool_add_totals(const struct vm_pool *p, struct vm_pool_totals *t);
/* The pool and its links as JSON (admin status); caller owns it. */
json_t *pool_status_json(const struct vm_pool *p);

/* Append a status summary of the pool and its links to the log. */
void pool_log_status(const struct vm_pool *p);

#endif
