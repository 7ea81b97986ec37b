/* A call in flight: the small record that ties a client's request to an upstream serial.
 *
 *   session --calls--> vm_call --link--> vm_link (inflight slot, up_serial)
 *                         \--qentry--> vm_pool queue (while waiting for a slot)
 *
 * The session owns its calls. When the client goes away first, `session` becomes NULL and the
 * call is "swallowed": the late reply is dropped and the record freed by whoever finishes it. */
#ifndef VM_CALL_H
#define VM_CALL_H

#include <stdint.h>
#include <sys/queue.h>
#include <sys/time.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;

/* Completion of a call the gateway makes itself (event registration): `reply` and `pkt` on a
 * reply (OK or ERROR status), or NULL and `error` when the link failed first. */
typedef void (*vm_call_done_fn)(void *arg, const struct vm_hdr *reply, struct evbuffer *pkt,
                                const char *error);

struct vm_call {
    struct vm_session *session; /* NULL once swallowed */
    struct vm_hdr hdr;          /* the client's header: reply serial and proc */
    struct evbuffer *pkt;       /* the packet until it is sent upstream; owned */
    struct vm_link *link;       /* where it is in flight; NULL while queued */
    uint32_t up_serial;         /* serial on the upstream connection */
    struct timeval deadline;    /* when waiting in the pool queue must end */
    vm_call_done_fn done;       /* set for the gateway's own calls (session is NULL) */
    void *done_arg;
    TAILQ_ENTRY(vm_call) qentry;
    TAILQ_ENTRY(vm_call) sentry;
};
TAILQ_HEAD(vm_call_list, vm_call);

/* Finish a call with the upstream reply `pkt` (consumed): the serial is put back to the
 * client's and the packet queued to the client; a swallowed call is just dropped. Frees c. */
void call_finish(struct vm_call *c, struct evbuffer *pkt);
/* Finish a call with a libvirt error of our own. Frees c. */
void call_fail(struct vm_call *c, int code, int domain, const char *message);

#endif
