/* Internals of the client session shared by session.c (dispatch, flow control, lifetime) and
 * session_auth.c (TLS establishment, SASL, the limits on unauthenticated clients). Nothing else
 * includes this: the rest of the engine sees only session.h. */
#ifndef VM_SESSION_INT_H
#define VM_SESSION_INT_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/util.h>

#include "call.h"
#include "events.h"
#include "identity.h"
#include "conn.h"
#include "env.h"
#include "keepalive.h"
#include "log.h"
#include "metrics.h"
#include "peer.h"
#include "proc.h"
#include "pool.h"
#include "router.h"
#include "session_host.h"
#include "stream.h"
#include "wire.h"

struct bufferevent;
struct evbuffer;
struct evbuffer_cb_info;
typedef struct ssl_st SSL;

#define OUT_HIGH (1u << 20) /* stop reading the client above this much unsent output */
#define OUT_LOW (256u << 10)
/* Event registration arguments are an event id and an optional object reference: a few
 * hundred bytes. They are kept for the registration's life, so they are bounded. */
#define EVENT_ARGS_MAX 8192
#define OUTSTANDING_BYTES_MAX ((size_t)64 << 20) /* call bytes one client may have in flight */

enum session_state { S_TLS, S_NEW, S_OPENING, S_OPEN, S_CLOSING };

struct vm_session {
    const struct vm_session_host *host; /* not owned: what we ask of the gateway */
    struct vm_env *env;                /* not owned: loop, config, audit, reaper, ids */
    const struct vm_listener_cfg *lcfg; /* not owned */
    unsigned id;
    char tag[160];
    struct vm_identity ident;          /* immutable after accept (auth will complete it) */
    char ident_str[160];
    char source[64];                   /* identity_source: key of the per-source limits */
    const struct vm_rule *rule;        /* config snapshot; set at OPEN */
    int rule_held;                     /* counted against rule->max_sessions */
    struct vm_conn *conn;              /* owned: the client's socket, framing, output */
    enum session_state state;
    int is_tcp;
    int close_after_flush;             /* hang up once everything is written ... */
    const char *close_reason;          /* ... for this reason */

    struct vm_hdr open_hdr;            /* the CONNECT_OPEN being answered */
    struct vm_open_wait open_wait;     /* our place among the pool's waiters */
    char *opened_name;                 /* owned: the name the client opened */
    struct vm_grant *grant;            /* owned: the rule's domain grant; NULL = all domains */
    struct vm_route route;             /* owned: upstream and forwarded name */
    int readonly;
    struct vm_pool *pool;              /* not owned; valid while home or opening */
    struct vm_link *home;              /* one reference held while open */

    struct vm_keepalive ka;            /* only armed once the client asked feature 10 */
    struct vm_call_list calls;         /* owned: outstanding forwarded calls */
    struct vm_fair fair;               /* our calls waiting in the pool queue (our turn) */
    int noutstanding;
    size_t outstanding_bytes;          /* bytes of those calls */
    struct vm_peer peer;               /* what events and streams see of us; their lists */
    int blocked;                       /* streams holding our reading (slow upstream) */
    /* What is queued to the client, as runs of event bytes and other bytes in FIFO order,
     * so that only events count against events.max_queue_bytes: a subscriber that reads
     * but asked for a large reply is not "a subscriber that does not read". */
    struct out_run { uint32_t len; int event; } *runs;
    int nruns, caprun, headrun;
    size_t event_bytes;     /* unsent event bytes */
    int adding_event;
    int unauth_slot;        /* holds one of the gateway's max_unauthenticated slots */
    struct event *auth_timer; /* owned: auth_timeout_s while not authenticated */
    int close_cb;                      /* the client registered a close callback */
    int authed;                        /* the listener's auth is satisfied */
    struct vm_sasl *auth;              /* owned: SASL state */
    SSL *ssl;                          /* owned by the TLS bufferevent */
    char sasl_user[256];               /* identity storage */
    char tls_dn[512];
    int slot;                          /* index in the gateway's registry */
    const char *peer_name;             /* points into tag: "127.0.0.1:40522", "uid=0 pid=7" */
    time_t since;                      /* accepted at (wall clock, for the admin status) */
    uint64_t ncalls;                   /* calls forwarded so far */
    int mlis, mup;                     /* metrics slots: listener; upstream (-1 until OPEN) */
    int draining;                      /* the gateway is stopping: no new calls; close once
                                        * nothing is outstanding */
};

/* Helpers both files use; inline so that session_auth.c never calls into session.c. */
static inline struct evbuffer *session_out(struct vm_session *s)
{
    return conn_output(s->conn);
}

/* An error REPLY (libvirt's error layout) to the session's call `h`. */
static inline void session_reply_error(struct vm_session *s, const struct vm_hdr *h, int code,
                                       int domain, const char *msg)
{
    char name[32];
    vm_debug(s->tag, "%s serial %u: error %d: %s", vm_proc_name(h->prog, h->proc, name, 32),
             h->serial, code, msg);
    metrics_error_code(s->env->metrics, code);
    wire_put_error(session_out(s), h, code, domain, msg);
}

/* session_auth.c: decisions and state of authentication; it reports outcomes by return value
 * and session.c acts on them (closing, installing callbacks on a new bufferevent). */
int session_uses_sasl(const struct vm_session *s);
/* Take a max_unauthenticated slot; NULL, or why the client must be closed (logged). */
const char *session_hold_unauth(struct vm_session *s);
/* Give back the max_unauthenticated slot and the auth timer, if held. */
void session_release_unauth(struct vm_session *s);
void session_set_authenticated(struct vm_session *s, const char *how);
/* AUTH_SASL_INIT/START/STEP and AUTH_POLKIT, answered on the session's output. When the
 * SASL security layer starts, it is pushed onto the connection. -1: close the session. */
int session_handle_auth(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt);
/* The TLS handshake is done: check the client certificate, then libvirt's 0x01 byte.
 * -1 with the reason in err: close the session without the byte. */
int session_tls_established(struct vm_session *s, char *err, size_t errlen);

#endif
