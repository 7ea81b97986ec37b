/* A call in flight: the small record that ties a request to an upstream serial.
 *
 *   owner (session, events) --done callback--+
 *                                            v
 *   vm_call --link--> vm_link (inflight slot, up_serial)
 *      \--qentry--> vm_pool queue (while waiting for a slot)
 *
 * Whoever makes a call gives it a completion callback; every call ends exactly once, in
 * call_finish (a reply) or call_fail (an error of the gateway's own), and the layer that ends
 * it (link or pool) never needs to know who made it. An owner that goes away first swallows
 * its calls in flight: the late reply is then dropped and the record freed by whoever ends it. */
#ifndef VM_CALL_H
#define VM_CALL_H

#include <stdint.h>
#include <sys/queue.h>
#include <sys/time.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;
struct vm_call;

/* Why a call failed without a reply: a libvirt error of the gateway's own. */
struct vm_call_error {
    int code;
    int domain;
    const char *message; /* the whole text the client prints */
};

/* Completion: `reply` and `pkt` (the whole reply packet, still owned by the caller) on a
 * reply with OK or ERROR status, or NULL, NULL and `err` when the gateway gave up on it. */
typedef void (*vm_call_done_fn)(void *arg, struct vm_call *c, const struct vm_hdr *reply,
                                struct evbuffer *pkt, const struct vm_call_error *err);

struct vm_call {
    struct vm_hdr hdr;          /* the caller's header: reply serial and proc */
    struct evbuffer *pkt;       /* owned: the packet until it is sent upstream (then empty) */
    struct vm_link *link;       /* where it is in flight; NULL while queued */
    uint32_t up_serial;         /* serial on the upstream connection */
    struct timeval deadline;    /* when waiting in the pool queue must end */
    struct timeval queued_at;   /* when it entered the pool queue (the reconnect hold) */
    uint64_t t0_ns;             /* when the client's call was handed on (latency metrics) */
    vm_call_done_fn done;       /* NULL once swallowed */
    void *done_arg;
    int internal;               /* the gateway's own call (event registration), not a client's */
    uint8_t grant_filter;       /* session: the reply goes through grant_filter_reply */
    uint32_t grant_aux;         /* session: what grant_filter_reply needs to know */
    char *grant_note;           /* owned, freed with the call: what the call asked for, for
                                 * grant_filter_reply's wording (NULL mostly) */
    uint8_t parked;             /* waits on a shared call in cache.c: in no queue, on no link;
                                 * the cache ends it (qentry links it there) */
    struct vm_fair *fair;       /* its owner's place in pool queues; NULL: the pool's own */
    TAILQ_ENTRY(vm_call) qentry; /* pool queue, in arrival order (deadlines) */
    TAILQ_ENTRY(vm_call) fentry; /* its owner's waiting calls (fair->calls) */
    TAILQ_ENTRY(vm_call) sentry; /* the owner's list of its calls */
};
TAILQ_HEAD(vm_call_list, vm_call);

/* An owner's waiting calls, embedded in the owner (a session). A pool serves the owners with
 * waiting calls round-robin, one call each turn, so one client's deep pipeline cannot hold
 * every other client's calls back; each owner's own calls keep their order. */
struct vm_fair {
    struct vm_call_list calls;  /* this owner's calls waiting in a pool queue (fentry) */
    TAILQ_ENTRY(vm_fair) entry; /* in the pool's round-robin while `calls` is not empty */
};

/* A new call record with an empty packet buffer. Allocation failure aborts. */
struct vm_call *call_new(vm_call_done_fn done, void *arg, int internal);
/* The owner is gone: the call will end silently. */
void call_swallow(struct vm_call *c);
/* End a call with the upstream reply in `pkt` (the caller's; the callback may move the bytes
 * out). Frees c. */
void call_finish(struct vm_call *c, struct evbuffer *pkt);
/* End a call with a libvirt error of our own. Frees c. */
void call_fail(struct vm_call *c, int code, int domain, const char *message);
/* Free a call that never started or was taken back from a queue (it may be recycled). */
void call_free(struct vm_call *c);
/* Give back half of the recycled records that were not needed since the last trim (all of
 * them with `all`, at shutdown). */
void call_cache_trim(int all);

#endif
