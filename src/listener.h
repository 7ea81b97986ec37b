/* Listeners: a TCP address or a unix socket that accepts libvirt clients into sessions. */
#ifndef VM_LISTENER_H
#define VM_LISTENER_H

#include <stddef.h>

#include <event2/util.h>

#include "fwd.h"

struct event_base;
struct vm_identity;
typedef struct ssl_ctx_st SSL_CTX;

/* A client was accepted: `fd` is now the callee's; `peer` is printable, `id` what the
 * listener knows of the client (copy it), `tls` the listener's context or NULL. */
typedef void (*vm_accept_fn)(void *owner, const struct vm_listener_cfg *cfg, evutil_socket_t fd,
                             const char *peer, const struct vm_identity *id, SSL_CTX *tls);

/* Bind the listener described by `cfg`; accepted clients go to `on_accept`. Returns NULL
 * after logging why. */
struct vm_listener *listener_new(struct event_base *base, const struct vm_listener_cfg *cfg,
                                 vm_accept_fn on_accept, void *owner);
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
