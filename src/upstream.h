/* One upstream connection ("link"): a socket to libvirtd opened once with AUTH_LIST, the
 * keepalive feature and CONNECT_OPEN, then shared by many sessions. Serials are its own; the
 * calls in flight sit in a small table indexed by upstream serial.
 *
 *   CONNECTING -> HANDSHAKE -> READY -> (socket lost) -> BACKOFF -> CONNECTING ...
 */
#ifndef VM_UPSTREAM_H
#define VM_UPSTREAM_H

#include <stddef.h>
#include <stdint.h>

#include "call.h"
#include "fwd.h"

/* One state, one switch: a link is in exactly one of these.
 *   CONNECTING -> HANDSHAKE -> READY -> BACKOFF -> CONNECTING ...   (its owner's)
 *   READY -> RETIRING (CONNECT_CLOSE sent, left its owner) -> CLOSED
 *   any -> CLOSED (link_free; the memory goes after the loop turn) */
enum vm_link_state {
    VM_LINK_CONNECTING,
    VM_LINK_HANDSHAKE,
    VM_LINK_READY,
    VM_LINK_BACKOFF,
    VM_LINK_RETIRING,
    VM_LINK_CLOSED,
};

#include <sys/queue.h>

struct evbuffer;
struct event_base;
TAILQ_HEAD(vm_link_list, vm_link);
struct vm_reaper;
struct vm_metrics;
struct vm_bytes;
typedef struct ssl_ctx_st SSL_CTX;

/* What a link needs to know, given by its owner; copied at link_new. */
struct vm_link_params {
    struct event_base *base;
    struct vm_reaper *reaper;          /* frees the link after the loop turn it closed in */
    struct vm_link_list *retiring;     /* where it waits while saying goodbye (link_retire) */
    const struct vm_upstream_cfg *up;  /* config snapshot; outlives the link */
    const char *name;                  /* the name to open upstream (copied) */
    int readonly;                      /* open with VIR_CONNECT_RO */
    unsigned id;                       /* for the log tag U#id */
    SSL_CTX *tls;                      /* the gateway's client context for tls:// upstreams */
    int keepalive_interval_s, keepalive_count;
    int dedicated;                     /* one stream's: not pooled, never reconnects, every
                                        * packet after the handshake goes to ops->packet */
    struct vm_metrics *metrics;        /* counters (may be NULL) ... */
    struct vm_bytes *bytes;            /* ... and its upstream's byte counters (may be NULL) */
};

/* How a link reports to its owner (a pool, or a stream for a dedicated link). The link never
 * names its owner's type; after link_detach (or once it leaves its owner) it calls nothing. */
struct vm_link_ops {
    /* The handshake is done; calls may be sent. */
    void (*ready)(void *owner, struct vm_link *l);
    /* A MESSAGE (event) on a pooled link; every packet on a dedicated one. */
    void (*packet)(void *owner, struct vm_link *l, const struct vm_hdr *h, struct evbuffer *pkt);
    /* A call slot freed up (optional). */
    void (*slot_free)(void *owner, struct vm_link *l);
    /* The output fell below its low mark (optional; dedicated links). */
    void (*drained)(void *owner, struct vm_link *l);
    /* The socket is gone or never came; `err_payload` is libvirtd's own error when it refused
     * the open. Calls in flight have already failed. A dedicated link is freed next. */
    void (*down)(void *owner, struct vm_link *l, const void *err_payload, size_t n,
                 const char *why);
    /* The link leaves its owner for good (freed, or retiring) (optional). */
    void (*gone)(void *owner, struct vm_link *l);
    /* Not reconnected for pool.give_up_s (optional). */
    void (*lost_for_good)(void *owner, struct vm_link *l, const char *why);
};

/* A new link; it starts connecting from the loop, never inside the caller. */
struct vm_link *link_new(const struct vm_link_params *p, const struct vm_link_ops *ops,
                         void *owner);
/* Free every link on `list` (the retiring ones, at shutdown). */
void link_free_retiring(struct vm_link_list *list);
/* Whether a link on `list` (saying goodbye) still points at upstream entry `up`: such an
 * entry must outlive it. */
int link_list_uses(const struct vm_link_list *list, const struct vm_upstream_cfg *up);
/* The owner is done with the link: no more callbacks. */
void link_detach(struct vm_link *l);
/* Raw access for a dedicated link. */
void link_write(struct vm_link *l, struct evbuffer *pkt);
size_t link_output_length(const struct vm_link *l);
void link_pause_reading(struct vm_link *l, int pause);
/* Close the socket and free the link. Calls in flight fail; the owner is told (gone). */
void link_free(struct vm_link *l);
/* Close an unused READY link politely: it leaves its owner at once, sends CONNECT_CLOSE and is
 * freed on the reply (or EOF, or after 2 s). Anything else is freed at once. */
void link_retire(struct vm_link *l);

enum vm_link_state link_state(const struct vm_link *l);
int link_refs(const struct vm_link *l);
int link_inflight(const struct vm_link *l);
/* The gateway's own calls in flight (event registrations). */
int link_internal(const struct vm_link *l);
int link_has_room(const struct vm_link *l);
const char *link_tag(const struct vm_link *l);

void link_ref(struct vm_link *l);
/* Drop a session's reference; an unused link is closed after idle_timeout_s. */
void link_unref(struct vm_link *l);

/* Put a call in flight (the link must be READY with room). Takes the call's packet. */
void link_send(struct vm_link *l, struct vm_call *c);
/* Send a call of the gateway's own (event registration) on this link, outside the
 * max_inflight budget; `done` is always called. Returns -1 (done not called) when the link is
 * not READY or its reserve is full. */
int link_send_internal(struct vm_link *l, uint32_t prog, int32_t proc, const void *args,
                       size_t n, vm_call_done_fn done, void *arg) VM_WUR;
/* Its upstream drains (on) or no longer does: a draining link that is unused (no sessions,
 * nothing in flight) retires at once instead of after idle_timeout_s. */
void link_set_draining(struct vm_link *l, int on);
/* Reconnect now instead of waiting for the backoff timer. */
void link_reconnect_now(struct vm_link *l);

#endif
