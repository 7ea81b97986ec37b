/* PROXY protocol version 2 headers (what a load balancer such as HAProxy sends with
 * `send-proxy-v2` before the client's own bytes): a pure parser over bytes, no I/O.
 *
 *   12 bytes signature | ver/cmd | family/transport | length (u16, big endian) | addresses | TLVs
 *
 * The listener reads exactly the header (16 bytes, then `length` more) and nothing beyond, so
 * the client's first byte (TLS ClientHello, libvirt packet) is still in the socket for the
 * session. Version 1 (the text form) is refused: HAProxy sends v2 with send-proxy-v2. */
#ifndef VM_PROXYPROTO_H
#define VM_PROXYPROTO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define VM_PROXY_FIXED_LEN 16
/* The longest header accepted: the fixed part, two unix addresses and a few hundred bytes of
 * TLVs. Anything longer is a garbled or hostile header, not a load balancer. */
#define VM_PROXY_MAX_LEN 1024

struct vm_proxy_hdr {
    size_t len;                  /* bytes of the whole header, TLVs included */
    int local;                   /* LOCAL command (health check): use the socket's own peer */
    int has_addr;                /* PROXY command with an INET/INET6 source in `src` */
    struct sockaddr_storage src; /* the client, with its port */
    struct sockaddr_storage dst; /* the address the client connected to */
};

/* Parse the header at the start of `buf` (`len` bytes received so far).
 * Returns 1 with `out` filled when the whole header is there (out->len bytes of it);
 * 0 when more bytes are needed: `*need` is the total length to have before calling again;
 * -1 when these bytes cannot start a valid v2 header, with a reason in `why` (static text).
 * Decides as early as it can: a first byte that is not the signature's fails at once. */
int proxyproto_parse(const uint8_t *buf, size_t len, struct vm_proxy_hdr *out, size_t *need,
                     const char **why);

#endif
