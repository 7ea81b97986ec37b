/* Streams (screenshot, volume upload/download, console, channel, tunnelled migration).
 *
 * Each stream gets a dedicated upstream connection, opened with the session's name and
 * read-only flag and closed when the stream ends. Pinning is then trivial (the creating call
 * and every STREAM / STREAM_HOLE packet of that serial use that socket; the serial is the
 * client's own, since nothing else shares the socket), and flow control cannot stall anyone
 * else: a slow client stops the gateway reading that one upstream socket (libvirtd then stops
 * producing), and a slow libvirtd stops the gateway reading that client.
 *
 *   client --STREAM(serial 9)--> session --stream_client_packet--> dedicated link --> libvirtd
 *   client <------------------- session <--stream_from_upstream--- dedicated link <--'
 */
#ifndef VM_STREAM_H
#define VM_STREAM_H

#include <sys/queue.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;
struct vm_stream;
TAILQ_HEAD(vm_stream_list, vm_stream);

/* Start a stream for the session's creating call `h` (the packet is consumed). */
void stream_start(struct vm_session *s, struct vm_pool *p, const struct vm_hdr *h,
                  struct evbuffer *pkt);
/* A STREAM / STREAM_HOLE packet from the client. Returns 0 when a stream took it, -1 when no
 * stream has that serial (the caller drops it, as libvirtd does). */
int stream_client_packet(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt);
/* The client is gone: abort its streams (closing the upstream socket aborts them there). */
void stream_session_gone(struct vm_session *s);
/* The client's output drained: resume reading upstream for its streams. */
void stream_session_drained(struct vm_session *s);
int stream_count(void);

/* Session side, implemented in session.c. */
struct vm_stream_list *session_streams(struct vm_session *s);
/* Uploads: hold the client's reading while a stream's upstream output is over the mark. */
void session_block_reading(struct vm_session *s, int on);
/* Is the client's output over the mark (a download must stop reading upstream)? */
int session_output_full(struct vm_session *s);

#endif
