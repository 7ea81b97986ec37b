/* A client as events and streams see it: somewhere to write packets, with back-pressure.
 * The session implements the ops and embeds the vm_peer; events.c and stream.c keep their
 * per-client lists in it. Neither knows what a session is.
 *
 *   session --embeds--> vm_peer {ops, subs, streams} <--events.c, stream.c write through ops
 */
#ifndef VM_PEER_H
#define VM_PEER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "fwd.h"

struct evbuffer;
struct vm_peer;
struct vm_sub;
struct vm_stream;
TAILQ_HEAD(vm_sub_list, vm_sub);
TAILQ_HEAD(vm_stream_list, vm_stream);

struct vm_peer_ops {
    /* The client's output buffer: packets appended here are sent in order. */
    struct evbuffer *(*output)(struct vm_peer *p);
    /* Queue an event packet (copied). -1 when the client's unsent events are over
     * events.max_queue_bytes: the caller cuts it off with close() after its loop. */
    int (*push_event)(struct vm_peer *p, const void *pkt, size_t len);
    /* Is the client's unsent output over its high mark (stop producing for it)? */
    int (*output_full)(struct vm_peer *p);
    /* Hold (on) or release the client's reading; holds nest. */
    void (*block_reading)(struct vm_peer *p, int on);
    /* A request answered later that is not a forwarded call: counted against
     * max_client_requests until request_end. */
    void (*request_begin)(struct vm_peer *p);
    void (*request_end)(struct vm_peer *p);
    void (*close)(struct vm_peer *p, const char *why);
};

struct vm_peer {
    const struct vm_peer_ops *ops;
    const char *tag;               /* the client's log tag */
    struct vm_sub_list subs;       /* its event subscriptions (events.c) */
    struct vm_stream_list streams; /* its streams (stream.c) */
    int32_t next_cb_id;            /* event callback ids handed to this client */
};

#endif
