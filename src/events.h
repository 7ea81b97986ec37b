/* Event fan-out: one upstream registration per (pool, program, register procedure, argument
 * bytes = event id + object filter), refcounted by the sessions that subscribe. Each subscriber
 * gets callback ids of its own; the callbackID word of every event is rewritten per subscriber.
 *
 *   peer A (cb 1) --.                                      libvirtd
 *   peer B (cb 1) ---+--> vm_evreg {up id 7} on the pool's event link <-- event (id 7)
 *   peer C (cb 3) --'          |
 *                                  `--> copy per subscriber, callbackID 7 -> 1 / 1 / 3
 */
#ifndef VM_EVENTS_H
#define VM_EVENTS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "fwd.h"
#include "wire.h"

#include "peer.h"

struct evbuffer;
struct vm_events;

struct vm_env;
/* Which READY link of the owner should carry the registrations (NULL: none now). */
typedef struct vm_link *(*vm_ready_link_fn)(void *owner);
/* The events state of one pool: `upstream` names it in messages, `ready_link` finds a link
 * for the registrations; a registration made while the event link reconnects waits for it up
 * to `hold_ms` (pool.reconnect_hold_ms; 0: it fails at once). */
struct vm_events *events_new(struct vm_env *env, const char *upstream, vm_ready_link_fn ready_link,
                             void *owner, int hold_ms);
/* The pool is going away: from now on calls finishing on its links leave this state alone
 * (call before the pool frees its links, then events_free). */
void events_shutdown(struct vm_events *ev);
void events_free(struct vm_events *ev);
/* Upstream registrations currently held (status, tests). */
int events_registrations(const struct vm_events *ev);
int events_subscribers(const struct vm_events *ev);
/* True while the events state keeps the pool alive. */
int events_busy(const struct vm_events *ev);

/* A client's register call `h` with argument bytes `args`; the client is answered later
 * (or at once) with its own callback id, or with the upstream's error. */
void events_subscribe(struct vm_events *ev, struct vm_peer *c, const struct vm_hdr *h,
                      const uint8_t *args, size_t n);
/* A client's deregister call for its callback id. Answered at once. */
void events_unsubscribe(struct vm_events *ev, struct vm_peer *c, const struct vm_hdr *h,
                        int32_t client_id);
/* The client is closing: drop all its subscriptions. */
void events_peer_gone(struct vm_events *ev, struct vm_peer *c);

/* An event MESSAGE arrived on link `l`. */
void events_deliver(struct vm_events *ev, struct vm_link *l, const struct vm_hdr *h,
                    struct evbuffer *pkt);
/* Link state changes, from the pool. */
void events_link_ready(struct vm_events *ev, struct vm_link *l);
void events_link_down(struct vm_events *ev, struct vm_link *l);

#endif
