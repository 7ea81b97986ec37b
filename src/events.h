/* Event fan-out: one upstream registration per (pool, program, register procedure, argument
 * bytes = event id + object filter), refcounted by the sessions that subscribe. Each subscriber
 * gets callback ids of its own; the callbackID word of every event is rewritten per subscriber.
 *
 *   session A (cb 1) --.                                   libvirtd
 *   session B (cb 1) ---+--> vm_evreg {up id 7} on the pool's event link <-- event (id 7)
 *   session C (cb 3) --'          |
 *                                  `--> copy per subscriber, callbackID 7 -> 1 / 1 / 3
 */
#ifndef VM_EVENTS_H
#define VM_EVENTS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;
struct vm_events;
struct vm_sub;
TAILQ_HEAD(vm_sub_list, vm_sub);

struct vm_env;
struct vm_events *events_new(struct vm_pool *p, struct vm_env *env);
/* The pool is going away: from now on calls finishing on its links leave this state alone
 * (call before the pool frees its links, then events_free). */
void events_shutdown(struct vm_events *ev);
void events_free(struct vm_events *ev);
/* Upstream registrations currently held (status, tests). */
int events_registrations(const struct vm_events *ev);
int events_subscribers(const struct vm_events *ev);
/* True while the events state keeps the pool alive. */
int events_busy(const struct vm_events *ev);

/* A session's register call `h` with argument bytes `args`; the session is answered later
 * (or at once) with its own callback id, or with the upstream's error. */
void events_subscribe(struct vm_events *ev, struct vm_session *s, const struct vm_hdr *h,
                      const uint8_t *args, size_t n);
/* A session's deregister call for its callback id. Answered at once. */
void events_unsubscribe(struct vm_events *ev, struct vm_session *s, const struct vm_hdr *h,
                        int32_t client_id);
/* The session is closing: drop all its subscriptions. */
void events_session_gone(struct vm_events *ev, struct vm_session *s);

/* An event MESSAGE arrived on link `l`. */
void events_deliver(struct vm_events *ev, struct vm_link *l, const struct vm_hdr *h,
                    struct evbuffer *pkt);
/* Link state changes, from the pool. */
void events_link_ready(struct vm_events *ev, struct vm_link *l);
void events_link_down(struct vm_events *ev, struct vm_link *l);

/* Session side, implemented in session.c. */
struct vm_sub_list *session_subs(struct vm_session *s);
int32_t session_next_callback_id(struct vm_session *s);
struct evbuffer *session_output(struct vm_session *s);
/* Queue an event packet (consumed) to the client. Returns -1 when the client's queue is over
 * the limit: the caller must cut the subscriber off (session_close) after its loop. */
int session_push_event(struct vm_session *s, const void *pkt, size_t len) VM_WUR;

#endif
