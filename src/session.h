/* The client session: one accepted client socket, speaking libvirt RPC as libvirtd would.
 * It answers the per-hop procedures itself (auth list, keepalive, features, open, close,
 * close callbacks, URI) and hands every other call to its pool. */
#ifndef VM_SESSION_H
#define VM_SESSION_H

#include <event2/util.h>

#include "fwd.h"
#include "session_host.h"

struct vm_identity;
typedef struct ssl_ctx_st SSL_CTX;

/* Take over an accepted socket `fd`. `peer` is a printable address for the log tag; `id` (copied)
 * is what the listener knows of the client. `host` must outlive the session. */
void session_new(const struct vm_session_host *host, const struct vm_listener_cfg *lcfg,
                 evutil_socket_t fd, const char *peer, const struct vm_identity *id,
                 SSL_CTX *tls);



/* What the admin endpoint shows of a session (pointers into the session and the config:
 * valid until the session is closed). */
struct vm_session_view {
    unsigned id;
    const char *identity;   /* "alice@tls", "uid=0@local" */
    const char *listener;
    const char *peer;       /* "127.0.0.1:40522" */
    const char *upstream;   /* NULL until CONNECT_OPEN is routed */
    const char *state;      /* "authenticating", "new", "opening", "open", "closing" */
    long long since;        /* accepted at, seconds since the epoch */
    unsigned long long calls; /* calls forwarded */
    int outstanding;        /* of those, not answered yet */
    int readonly;
};
void session_view(const struct vm_session *s, struct vm_session_view *v);

const char *session_tag(const struct vm_session *s);
struct vm_link *session_home(const struct vm_session *s);
/* Calls of `s` forwarded or queued and not yet answered. */
int session_outstanding(const struct vm_session *s);
int session_slot(const struct vm_session *s);
/* What the session points to in a config snapshot (the gateway keeps a snapshot while any of
 * these is in it): its listener, its policy rule (NULL before OPEN), its routed upstream. */
const struct vm_listener_cfg *session_listener(const struct vm_session *s);
const struct vm_rule *session_rule(const struct vm_session *s);
const struct vm_upstream_cfg *session_upstream(const struct vm_session *s);
void session_set_slot(struct vm_session *s, int slot);

/* The home link is lost for good: a session that registered a close callback gets
 * CONNECT_EVENT_CONNECTION_CLOSED, then every such session is closed once flushed. */
void session_upstream_lost(struct vm_session *s, const char *why);
/* Its home link is lost for good but another link of its pool is READY: make that one the
 * home (the reference moves). 0 when re-homed, -1 when there is none (then it is lost). */
int session_rehome(struct vm_session *s);

/* The session's id (C#id in its log tag and the admin status). */
unsigned session_id(const struct vm_session *s);
/* The gateway is stopping: calls already outstanding finish, new ones that would reach an
 * upstream are refused ("virtmux is shutting down"), and the session closes (cleanly, once
 * its output is written) as soon as nothing is outstanding, maybe at once. Call it again
 * from time to time (from the loop, not from a callback of the session's objects): it closes
 * a session that became idle with nothing left to write. */
void session_drain(struct vm_session *s);
/* Nothing outstanding and no OPEN pending. */
int session_idle(const struct vm_session *s);

/* Close a session for `why` (logged). Idempotent; the memory is reaped after this loop turn. */
void session_close(struct vm_session *s, const char *why);

#endif
