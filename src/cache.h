/* Coalescing and the micro-cache of one pool (issue #13 items 3 and 4).
 *
 *   session forward_call ──cache_call(c)──┬─> HIT:   c answered now from a stored reply
 *                                         ├─> JOIN:  c parked on an identical call in flight
 *                                         ├─> LEAD:  a new shared upstream call is returned;
 *                                         │          c is parked on it; the session submits it
 *                                         └─> c:     not shareable, submitted as usual
 *
 *   shared call's reply ──> stored (cacheable, nothing invalidated meanwhile) ──> every parked
 *                           caller gets a copy through call_finish (its own serial, its own
 *                           grant filter) or the same error through call_fail
 *
 * "Identical" is the same program, procedure and argument bytes (a hash, then a full compare).
 * Only plain calls of read-only verdict "yes" are shared. The shared upstream call belongs to
 * the cache, not to any session: a caller leaving only swallows its own parked record, so the
 * first caller leaving does not cancel the call for the others.
 *
 * Invalidation (every stored entry dropped, calls in flight no longer joinable, replies of
 * calls sent before it not stored): a lifecycle event (the cache subscribes to
 * DOMAIN_EVENT_CALLBACK_LIFECYCLE through the pool's events.c like a client would, sharing
 * the registration with clients that asked the same), a write through the gateway to the
 * upstream (cache_invalidate, from the gateway), and the loss of a link (events may be lost
 * while it is re-registered). Replies are only stored while that registration is active.
 */
#ifndef VM_CACHE_H
#define VM_CACHE_H

#include "fwd.h"
#include "metrics.h"

struct vm_env;
struct vm_events;
struct vm_cache;

/* The cache state of one pool of upstream `up` (read-only pool or not); `ev` is the pool's
 * events state (the lifecycle subscription), `mup` its upstream's metrics slot. */
struct vm_cache *cache_new(struct vm_env *env, const struct vm_upstream_cfg *up, int readonly,
                           struct vm_events *ev, int mup);
/* The pool is going away: drop the subscription and forget `ev` (before events_free). Shared
 * calls still in flight end normally when the pool fails them. */
void cache_shutdown(struct vm_cache *k);
void cache_free(struct vm_cache *k);

/* A session's call `c` (header and packet set, owned by the session): NULL when the cache
 * took it (answered now, or parked until the shared call ends: c->parked is set); else the
 * call to hand to pool_submit (c itself, or the new shared call). */
struct vm_call *cache_call(struct vm_cache *k, struct vm_call *c) VM_WUR;

/* Drop every stored reply and stop joining calls in flight; `why` is one of the
 * VM_CACHE_INVALIDATED_* counters. NULL k: nothing. */
void cache_invalidate(struct vm_cache *k, enum vm_cache_stat why);
/* One of the pool's links went down: events may be missed until re-registration. */
void cache_link_down(struct vm_cache *k);

/* Counts for the admin status. */
int cache_entries(const struct vm_cache *k);
int cache_inflight(const struct vm_cache *k);

#endif
