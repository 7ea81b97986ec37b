/* Listeners: a TCP address or a unix socket that accepts libvirt clients into sessions.
 *
 *   accept ──[proxy_protocol]── pending: read the PROXY v2 header (exactly), timeout,
 *     │                          an unauthenticated slot held against the balancer
 *     │                                │ the client's real address replaces the peer's
 *     └────────────────────────────────┴──> ops->accept(fd, peer, identity, TLS context)
 */
#ifndef VM_LISTENER_H
#define VM_LISTENER_H

#include <stddef.h>

#include <event2/util.h>

#include "fwd.h"
#include "session_host.h"

struct event_base;
struct vm_identity;
typedef struct ssl_ctx_st SSL_CTX;

/* A client was accepted: `fd` is now the callee's; `peer` is printable, `id` what the
 * listener knows of the client (copy it), `tls` the listener's context or NULL. */
typedef void (*vm_accept_fn)(void *owner, const struct vm_listener_cfg *cfg, evutil_socket_t fd,
                             const char *peer, const struct vm_identity *id, SSL_CTX *tls);

/* What a listener asks of its owner (the gateway). */
struct vm_listener_ops {
    vm_accept_fn accept;
    /* PROXY protocol listeners: a socket still waiting for its header is an unauthenticated
     * client and holds a slot from hold() (VM_UNAUTH_OK, or why not) until release(). No
     * source: before the header it is the balancer's, shared by every client behind it. */
    enum vm_unauth (*hold)(void *owner);
    void (*release)(void *owner);
    /* A connection was closed for a missing, garbled or late PROXY header (counted). */
    void (*header_refused)(void *owner);
};

/* Bind the listener described by `cfg`; accepted clients go to `ops->accept` (on a
 * `proxy_protocol` listener once their PROXY v2 header, which must arrive within
 * `header_timeout_ms`, has been read and nothing beyond it). Returns NULL after logging why. */
struct vm_listener *listener_new(struct event_base *base, const struct vm_listener_cfg *cfg,
                                 const struct vm_listener_ops *ops, void *owner,
                                 int header_timeout_ms);
void listener_free(struct vm_listener *l);
/* Re-read the TLS certificate, key, CA and CRL files; the old context stays on failure.
 * Sessions already connected keep theirs. */
int listener_reload_tls(struct vm_listener *l);
/* Reload kept the socket: describe the listener (and its future sessions) with `cfg`, a
 * newer snapshot's entry with the same socket. */
void listener_set_cfg(struct vm_listener *l, const struct vm_listener_cfg *cfg);
/* Stop or resume accepting (used at max_clients). */
void listener_set_enabled(struct vm_listener *l, int on);

/* Bound (not yet listening) sockets, for listeners and the admin endpoint. -1 with a reason. */
evutil_socket_t listener_bind_tcp(const char *address, char *err, size_t errlen);
evutil_socket_t listener_bind_unix(const char *path, unsigned mode, char *err, size_t errlen);

#endif
