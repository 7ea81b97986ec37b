/* Streams (screenshot, volume upload/download, console, channel, tunnelled migration).
 *
 * Each stream gets a dedicated upstream connection, opened with the session's name and
 * read-only flag and closed when the stream ends. Pinning is then trivial (the creating call
 * and every STREAM / STREAM_HOLE packet of that serial use that socket; the serial is the
 * client's own, since nothing else shares the socket), and flow control cannot stall anyone
 * else: a slow client stops the gateway reading that one upstream socket (libvirtd then stops
 * producing), and a slow libvirtd stops the gateway reading that client.
 *
 *   client --STREAM(serial 9)--> peer --stream_client_packet--> dedicated link --> libvirtd
 *   client <---------------- peer output <----(link ops: packet)--- dedicated link <--'
 */
#ifndef VM_STREAM_H
#define VM_STREAM_H

#include "fwd.h"
#include "wire.h"

#include "peer.h"

struct evbuffer;

/* Start a stream for the client's creating call `h` (the packet is consumed) on pool `p`. */
void stream_start(struct vm_peer *c, struct vm_pool *p, const struct vm_hdr *h,
                  struct evbuffer *pkt);
/* A STREAM / STREAM_HOLE packet from the client. Returns 0 when a stream took it, -1 when no
 * stream has that serial (the caller drops it, as libvirtd does). */
int stream_client_packet(struct vm_peer *c, const struct vm_hdr *h, struct evbuffer *pkt);
/* The client is gone: abort its streams (closing the upstream socket aborts them there). */
void stream_peer_gone(struct vm_peer *c);
/* The client's output drained: resume reading upstream for its streams. */
void stream_peer_drained(struct vm_peer *c);
/* Streams open now, in the whole gateway. */
int stream_count(void);

#endif
