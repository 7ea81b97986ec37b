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

enum vm_link_state { VM_LINK_CONNECTING, VM_LINK_HANDSHAKE, VM_LINK_READY, VM_LINK_BACKOFF };

struct evbuffer;
struct vm_stream;

/* A new link for pool `p`; it starts connecting at once. */
struct vm_link *link_new(struct vm_pool *p);
/* A link dedicated to one stream: same name and flags as pool `p`, but not in the pool; every
 * packet goes to the stream, and it never reconnects. */
struct vm_link *link_new_dedicated(struct vm_pool *p, struct vm_stream *st);
/* The stream is done with its link: no more callbacks to it. */
void link_detach_stream(struct vm_link *l);
/* Raw access for a dedicated link. */
void link_write(struct vm_link *l, struct evbuffer *pkt);
size_t link_output_length(const struct vm_link *l);
void link_pause_reading(struct vm_link *l, int pause);
/* Close the socket and free the link. Calls in flight fail; the pool is told. */
void link_free(struct vm_link *l);
/* Close an unused READY link politely: it leaves the pool at once, sends CONNECT_CLOSE and is
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
/* Reconnect now instead of waiting for the backoff timer. */
void link_reconnect_now(struct vm_link *l);

#endif
