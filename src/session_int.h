/* Internals of the client session shared by session.c (dispatch, flow control, lifetime) and
 * session_auth.c (TLS establishment, SASL, the limits on unauthenticated clients). Nothing else
 * includes this: the rest of the engine sees only session.h. */
#ifndef VM_SESSION_INT_H
#define VM_SESSION_INT_H

#include <stddef.h>
#include <stdint.h>

#include <event2/util.h>

#include "call.h"
#include "events.h"
#include "identity.h"
#include "keepalive.h"
#include "router.h"
#include "stream.h"
#include "wire.h"

struct bufferevent;
struct evbuffer;
struct evbuffer_cb_info;
typedef struct ssl_st SSL;

#define OUT_HIGH (1u << 20) /* stop reading the client above this much unsent output */
#define OUT_LOW (256u << 10)
#define OUTSTANDING_BYTES_MAX ((size_t)64 << 20) /* call bytes one client may have in flight */

enum session_state { S_TLS, S_NEW, S_OPENING, S_OPEN, S_CLOSING };

struct vm_session {
    struct vm_gateway *gw;             /* not owned */
    const struct vm_listener_cfg *lcfg; /* not owned */
    unsigned id;
    char tag[160];
    struct vm_identity ident;          /* immutable after accept (auth will complete it) */
    char ident_str[160];
    const struct vm_rule *rule;        /* config snapshot; set at OPEN */
    int rule_held;                     /* counted against rule->max_sessions */
    struct bufferevent *bev;           /* owned */
    enum session_state state;
    int is_tcp;
    int paused;                        /* reading disabled for back-pressure */
    int close_after_flush;             /* hang up once everything is written ... */
    const char *close_reason;          /* ... for this reason */
    uint32_t skip_bytes;               /* FD dummy bytes to discard after a refused FD call */
    struct event *kick;                /* owned: resumes input processing after a pause */
    struct event *hup;                 /* owned: notices a hang-up while reading is paused ... */
    int hup_fd;                        /* ... on this dup of the socket (owned while hup) */

    struct vm_hdr open_hdr;            /* the CONNECT_OPEN being answered */
    char *opened_name;                 /* owned: the name the client opened */
    struct vm_route route;             /* owned: upstream and forwarded name */
    int readonly;
    struct vm_pool *pool;              /* not owned; valid while home or opening */
    struct vm_link *home;              /* one reference held while open */

    struct vm_keepalive ka;            /* only armed once the client asked feature 10 */
    struct vm_call_list calls;         /* owned: outstanding forwarded calls */
    int noutstanding;
    size_t outstanding_bytes;          /* bytes of those calls */
    struct vm_sub_list subs;           /* event subscriptions (owned by the pool's events) */
    struct vm_stream_list streams;     /* owned */
    int blocked;                       /* streams holding our reading (slow upstream) */
    int32_t next_cb_id;
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
};

/* session.c */
struct evbuffer *session_out(struct vm_session *s);
void session_reply_error(struct vm_session *s, const struct vm_hdr *h, int code, int domain,
                         const char *msg);
void session_read_cb(struct bufferevent *bev, void *arg);
void session_write_cb(struct bufferevent *bev, void *arg);
void session_event_cb(struct bufferevent *bev, short what, void *arg);
void session_output_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg);

/* session_auth.c */
int session_uses_sasl(const struct vm_session *s);
/* Give back the max_unauthenticated slot and the auth timer, if held. */
void session_release_unauth(struct vm_session *s);
void session_set_authenticated(struct vm_session *s, const char *how);
/* AUTH_SASL_INIT/START/STEP and AUTH_POLKIT. */
void session_handle_auth(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt);
/* The TLS handshake is done: check the client certificate, then libvirt's 0x01 byte. */
void session_tls_established(struct vm_session *s);
void session_auth_timeout_cb(evutil_socket_t fd, short what, void *arg);

#endif
