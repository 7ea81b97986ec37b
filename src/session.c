/*
 * The client session.
 *
 *   client socket --read--> frames --> handle_call --local--> reply (auth list, features,
 *        ^                                 |                   open, close, URI, keepalive)
 *        |                                 `--forward--> vm_call --> pool_submit --> link
 *        `---------------- reply <-- call_finish (serial restored) <--------------'
 *
 * Back-pressure: a session stops reading its socket while it has max_client_requests calls
 * outstanding or more than OUT_HIGH bytes waiting to be written to it, the way libvirtd does.
 * That bounds what one client can make the gateway hold, and a slow reader only slows itself.
 */
#include "session.h"
#include "session_int.h"

#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "audit.h"
#include "auth.h"
#include "call.h"
#include "config.h"
#include "events.h"
#include "gateway.h"
#include "identity.h"
#include "keepalive.h"
#include "log.h"
#include "policy.h"
#include "pool.h"
#include "proc.h"
#include "router.h"
#include "stream.h"
#include "tls.h"
#include "upstream.h"
#include "wire.h"
#include "util.h"

#define MAX_NAME_LEN 4096


static void process_input(struct vm_session *s);

struct vm_sub_list *session_subs(struct vm_session *s)
{
    return &s->subs;
}

int32_t session_next_callback_id(struct vm_session *s)
{
    return s->next_cb_id++;
}

struct vm_stream_list *session_streams(struct vm_session *s)
{
    return &s->streams;
}

int session_output_full(struct vm_session *s)
{
    return evbuffer_get_length(bufferevent_get_output(s->bev)) > OUT_HIGH;
}

static void update_flow(struct vm_session *s);

void session_block_reading(struct vm_session *s, int on)
{
    s->blocked += on ? 1 : -1;
    update_flow(s);
}

struct evbuffer *session_output(struct vm_session *s)
{
    return bufferevent_get_output(s->bev);
}

int session_push_event(struct vm_session *s, const void *pkt, size_t len)
{
    if (s->event_bytes + len > (size_t)gateway_config(s->gw)->event_queue_bytes)
        return -1;
    s->adding_event = 1;
    evbuffer_add(bufferevent_get_output(s->bev), pkt, len);
    s->adding_event = 0;
    return 0;
}

/* Track what enters and leaves the client's output buffer (see `runs`). */
void session_output_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    struct vm_session *s = arg;
    if (info->n_added) {
        int ev = s->adding_event;
        struct out_run *last = s->nruns ? &s->runs[(s->headrun + s->nruns - 1) % s->caprun] : NULL;
        if (last && last->event == ev && last->len + info->n_added >= last->len) {
            last->len += (uint32_t)info->n_added;
        } else {
            if (s->nruns == s->caprun) { /* grow the ring, unrolling it */
                int cap = s->caprun ? s->caprun * 2 : 16;
                struct out_run *r = malloc((size_t)cap * sizeof(*r));
                if (!r)
                    abort();
                for (int i = 0; i < s->nruns; i++)
                    r[i] = s->runs[(s->headrun + i) % s->caprun];
                free(s->runs);
                s->runs = r;
                s->caprun = cap;
                s->headrun = 0;
            }
            s->runs[(s->headrun + s->nruns) % s->caprun] =
                (struct out_run){(uint32_t)info->n_added, ev};
            s->nruns++;
        }
        if (ev)
            s->event_bytes += info->n_added;
    }
    size_t del = info->n_deleted;
    while (del && s->nruns) {
        struct out_run *r = &s->runs[s->headrun];
        size_t k = del < r->len ? del : r->len;
        r->len -= (uint32_t)k;
        del -= k;
        if (r->event)
            s->event_bytes -= k;
        if (!r->len) {
            s->headrun = (s->headrun + 1) % s->caprun;
            s->nruns--;
        }
    }
}

const char *session_tag(const struct vm_session *s)
{
    return s->tag;
}

struct vm_link *session_home(const struct vm_session *s)
{
    return s->home;
}

int session_slot(const struct vm_session *s)
{
    return s->slot;
}

void session_set_slot(struct vm_session *s, int slot)
{
    s->slot = slot;
}

void session_upstream_lost(struct vm_session *s, const char *why)
{
    if (s->state == S_CLOSING)
        return;
    vm_warn(s->tag, "upstream connection lost for good: %s", why);
    if (s->close_cb) {
        struct xbuf b;
        xb_init(&b);
        xb_i32(&b, 1); /* VIR_CONNECT_CLOSE_REASON_EOF */
        wire_put_packet(bufferevent_get_output(s->bev), VM_PROG_REMOTE,
                        VM_PROC_CONNECT_EVENT_CONNECTION_CLOSED,
                        VM_MESSAGE, 1, VM_STATUS_OK, b.p, b.len);
        xb_free(&b);
    }
    if (s->home) {
        pool_release(s->pool, s->home);
        s->home = NULL;
    }
    s->close_after_flush = 1;
    s->close_reason = "upstream lost for good";
    bufferevent_disable(s->bev, EV_READ);
    if (evbuffer_get_length(bufferevent_get_output(s->bev)) == 0)
        session_close(s, "upstream lost for good");
}

struct evbuffer *session_out(struct vm_session *s)
{
    return bufferevent_get_output(s->bev);
}

void session_reply_error(struct vm_session *s, const struct vm_hdr *h, int code, int domain,
                         const char *msg)
{
    vm_debug(s->tag, "proc %d serial %u: error %d: %s", h->proc, h->serial, code, msg);
    wire_put_error(session_out(s), h, code, domain, msg);
}

static void reply_u32(struct vm_session *s, const struct vm_hdr *h, uint32_t v)
{
    struct xbuf b;
    xb_init(&b);
    xb_u32(&b, v);
    wire_put_reply(session_out(s), h, b.p, b.len);
    xb_free(&b);
}

/* Something happened on a paused client's socket: a hang-up ends the session; new bytes wait
 * for reading to resume. */
static void hup_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
        session_close(arg, "client hung up");
}

/* While reading is paused the bufferevent cannot see EOF: a client that hangs up with its
 * calls stuck upstream would hold its slot until they return, forever if they never do
 * (libvirtd's poll sees POLLHUP whatever it asked for). The watch is edge-triggered, so bytes
 * that keep arriving cannot spin the loop, and a reset (which epoll reports as readable, not
 * as EV_CLOSED) is seen too. It sits on a dup of the socket: libevent refuses to mix edge-
 * and level-triggered events on one descriptor, and the bufferevent's are level-triggered. */
static void watch_hangup(struct vm_session *s, int on)
{
    if (!on) {
        if (s->hup) {
            event_free(s->hup);
            close(s->hup_fd);
        }
        s->hup = NULL;
        return;
    }
    evutil_socket_t fd = bufferevent_getfd(s->bev);
    if (s->hup || fd < 0)
        return; /* no socket: EOF is seen when reading resumes, as before */
    s->hup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (s->hup_fd < 0)
        return;
    s->hup = event_new(gateway_base(s->gw), s->hup_fd, EV_READ | EV_CLOSED | EV_ET | EV_PERSIST,
                       hup_cb, s);
    if (!s->hup || event_add(s->hup, NULL) < 0)
        abort();
}

/* Pause or resume reading from the client according to its load. */
static void update_flow(struct vm_session *s)
{
    if (s->state == S_CLOSING)
        return;
    int max = gateway_config(s->gw)->max_client_requests;
    size_t out = evbuffer_get_length(session_out(s));
    /* Calls are bounded in number and in bytes: 16 calls of 32 MiB would otherwise let one
     * client park half a gigabyte in the gateway. */
    int busy = s->noutstanding >= max || s->outstanding_bytes > OUTSTANDING_BYTES_MAX ||
               out > OUT_HIGH || s->blocked > 0;
    if (busy && !s->paused) {
        s->paused = 1;
        bufferevent_disable(s->bev, EV_READ);
        watch_hangup(s, 1);
    } else if (!busy && s->paused && out <= OUT_LOW) {
        s->paused = 0;
        watch_hangup(s, 0);
        bufferevent_enable(s->bev, EV_READ);
        event_active(s->kick, 0, 0); /* frames may already be buffered */
    }
}

/* ---- calls ---- */

static void call_free(struct vm_call *c)
{
    if (c->pkt)
        evbuffer_free(c->pkt);
    free(c);
}

static void call_detach(struct vm_call *c)
{
    struct vm_session *s = c->session;
    TAILQ_REMOVE(&s->calls, c, sentry);
    s->noutstanding--;
    s->outstanding_bytes -= c->hdr.len;
    c->session = NULL;
}

void call_finish(struct vm_call *c, struct evbuffer *pkt)
{
    struct vm_session *s = c->session;
    if (c->done) {
        struct vm_hdr h;
        wire_hdr_peek(pkt, &h);
        c->done(c->done_arg, &h, pkt, NULL);
    } else if (s) {
        wire_set_serial(pkt, c->hdr.serial);
        evbuffer_add_buffer(session_out(s), pkt);
        call_detach(c);
        update_flow(s);
    }
    evbuffer_free(pkt);
    call_free(c);
}

void call_fail(struct vm_call *c, int code, int domain, const char *message)
{
    struct vm_session *s = c->session;
    if (c->done) {
        c->done(c->done_arg, NULL, NULL, message);
    } else if (s) {
        session_reply_error(s, &c->hdr, code, domain, message);
        call_detach(c);
        update_flow(s);
    }
    call_free(c);
}

/* ---- keepalive towards the client ---- */

static void ka_ping(void *arg)
{
    struct vm_session *s = arg;
    wire_put_keepalive(session_out(s), VM_PROC_KEEPALIVE_PING);
}

static void ka_dead(void *arg)
{
    session_close(arg, "keepalive timeout");
}

/* ---- open / close ---- */

/* Refuse a routed CONNECT_OPEN for a policy reason: audit, answer 88, forget the route. */
static void deny_open(struct vm_session *s, const struct vm_hdr *h, const char *err, char *name)
{
    audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, "CONNECT_OPEN",
                 s->route.upstream->name, err);
    session_reply_error(s, h, VIR_ERR_ACCESS_DENIED, VIR_FROM_ACCESS, err);
    route_clear(&s->route);
    free(name);
}

static void handle_open(struct vm_session *s, const struct vm_hdr *h, const uint8_t *args, size_t n)
{
    if (s->state != S_NEW) {
        session_reply_error(s, h, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC,
                            "internal error: connection already open");
        return;
    }
    struct xrd r;
    int present;
    xr_init(&r, args, n);
    char *name = xr_opt_string(&r, MAX_NAME_LEN, &present);
    uint32_t flags = xr_u32(&r);
    if (r.err) {
        free(name);
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "Unable to decode message payload");
        return;
    }
    if (!name) {
        name = strdup("");
        if (!name)
            abort();
    }
    char err[600];
    const struct vm_config *cfg = gateway_config(s->gw);
    const struct vm_rule *rule = policy_match(cfg, &s->ident);
    if (rule->deny) {
        snprintf(err, sizeof(err), "access denied: virtmux policy does not admit %s",
                 s->ident_str);
        audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, "CONNECT_OPEN", NULL, err);
        session_reply_error(s, h, VIR_ERR_ACCESS_DENIED, VIR_FROM_ACCESS, err);
        free(name);
        return;
    }
    if (router_resolve(cfg, s->lcfg->upstream, name, &s->route, err, sizeof(err)) < 0) {
        vm_info(s->tag, "open \"%s\" refused: %s", name, err);
        session_reply_error(s, h, VIR_ERR_NO_CONNECT, VIR_FROM_NONE, err);
        free(name);
        return;
    }
    if (!policy_allows_upstream(rule, s->route.upstream->name)) {
        snprintf(err, sizeof(err), "access denied: virtmux policy does not let %s reach "
                 "upstream %s", s->ident_str, s->route.upstream->name);
        deny_open(s, h, err, name);
        return;
    }
    if (!s->rule_held) {
        if (gateway_rule_acquire(s->gw, rule) < 0) {
            snprintf(err, sizeof(err), "access denied: %s already has the %d sessions its "
                     "virtmux policy allows", s->ident_str, rule->max_sessions);
            deny_open(s, h, err, name);
            return;
        }
        s->rule = rule;
        s->rule_held = 1;
    }
    free(s->opened_name);
    s->opened_name = name;
    s->readonly = (flags & 1) || rule->readonly || s->lcfg->readonly;
    s->open_hdr = *h;
    s->state = S_OPENING;
    s->pool = gateway_pool(s->gw, s->route.upstream, s->route.name, s->readonly);
    vm_info(s->tag, "open \"%s\" -> upstream %s as \"%s\"%s", name, s->route.upstream->name,
            s->route.name, s->readonly ? " (read-only)" : "");
    pool_open(s->pool, s);
}

void session_open_done(struct vm_session *s, struct vm_link *home, const void *err_payload,
                       size_t n, const char *message)
{
    if (home) {
        s->home = home;
        s->state = S_OPEN;
        wire_put_reply(session_out(s), &s->open_hdr, NULL, 0);
        vm_debug(s->tag, "open: home %s", link_tag(home));
        return;
    }
    struct vm_pool *p = s->pool;
    s->pool = NULL;
    s->state = S_NEW;
    route_clear(&s->route);
    if (err_payload) {
        wire_put_packet(session_out(s), s->open_hdr.prog, s->open_hdr.proc, VM_REPLY,
                        s->open_hdr.serial, VM_STATUS_ERROR, err_payload, n);
    } else {
        session_reply_error(s, &s->open_hdr, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, message);
    }
    vm_info(s->tag, "open failed: %s", message ? message : "refused by upstream");
    gateway_pool_check(s->gw, p);
}

void session_home_lost(struct vm_session *s)
{
    s->home = NULL;
}

/* ---- dispatch ---- */

/* Hand a call to the pool; the packet moves into the call record. */
static void forward_call(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt)
{
    struct vm_call *c = vm_calloc(1, sizeof(*c));
    c->session = s;
    c->hdr = *h;
    c->pkt = evbuffer_new();
    if (!c->pkt)
        abort();
    evbuffer_add_buffer(c->pkt, pkt);
    TAILQ_INSERT_TAIL(&s->calls, c, sentry);
    s->noutstanding++;
    s->outstanding_bytes += h->len;
    pool_submit(s->pool, s->home, c);
    if (s->state != S_CLOSING)
        update_flow(s);
}

static int require_open(struct vm_session *s, const struct vm_hdr *h)
{
    if (s->state == S_OPEN)
        return 1;
    session_reply_error(s, h, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC,
                        "internal error: hypervisor connection not open");
    return 0;
}

static void handle_feature(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt,
                           const uint8_t *args, size_t n)
{
    struct xrd r;
    xr_init(&r, args, n);
    int32_t feature = xr_i32(&r);
    if (r.err) {
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "Unable to decode message payload");
        return;
    }
    const struct vm_config *cfg = gateway_config(s->gw);
    switch (feature) {
    case VM_FEATURE_PROGRAM_KEEPALIVE:
        /* Per hop, and valid before OPEN. The client has a keepalive handler: we may PING. */
        reply_u32(s, h, 1);
        if (!s->ka.timer && keepalive_start(&s->ka, gateway_base(s->gw), cfg->keepalive_interval_s,
                                            cfg->keepalive_count, ka_ping, ka_dead, s) < 0)
            vm_warn(s->tag, "cannot arm keepalive");
        return;
    case VM_FEATURE_REMOTE_EVENT_CALLBACK:
    case VM_FEATURE_REMOTE_CLOSE_CALLBACK:
        if (require_open(s, h))
            reply_u32(s, h, 1);
        return;
    case VM_FEATURE_FD_PASSING:
        if (require_open(s, h))
            reply_u32(s, h, 0); /* FDs are never relayed through the gateway */
        return;
    default:
        break;
    }
    if (!require_open(s, h))
        return;
    /* A driver feature (migration, typed params, ...): the upstream decides. */
    forward_call(s, h, pkt);
}

static void refuse(struct vm_session *s, const struct vm_hdr *h, const char *what,
                   const struct vm_proc_info *info)
{
    char msg[300];
    snprintf(msg, sizeof(msg),
             "this function is not supported by the connection driver: %s (%s) through virtmux",
             what, info ? info->name : "?");
    session_reply_error(s, h, VIR_ERR_NO_SUPPORT, VIR_FROM_RPC, msg);
}

/* Event (de)registration: fanned out through the pool's events state. */
static void handle_event_call(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt,
                              const struct vm_proc_info *info)
{
    if (info->legacy) {
        refuse(s, h, "legacy event registration is not relayed; virtmux offers callback "
                     "events (feature 14), which every libvirt client since 1.3 uses", info);
        return;
    }
    size_t n = h->len - VM_HDR_LEN;
    if (n > 65536) {
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "Unable to decode message payload");
        return;
    }
    uint8_t *args = evbuffer_pullup(pkt, -1) + VM_HDR_LEN;
    if (info->kind == VM_PK_EVENT_REGISTER) {
        events_subscribe(pool_events(s->pool), s, h, args, n);
        return;
    }
    struct xrd r;
    xr_init(&r, args, n);
    int32_t id = xr_i32(&r);
    if (r.err) {
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "Unable to decode message payload");
        return;
    }
    events_unsubscribe(pool_events(s->pool), s, h, id);
}

/* A CALL. `pkt` holds the whole packet; consumed only when forwarded. */
static void handle_call(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt)
{
    char msg[200];
    if (h->status != VM_STATUS_OK) {
        snprintf(msg, sizeof(msg), "Unexpected message status %u", h->status);
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, msg);
        return;
    }
    if ((h->prog != VM_PROG_REMOTE && h->prog != VM_PROG_QEMU && h->prog != VM_PROG_LXC) ||
        h->vers != VM_PROG_VERSION) {
        snprintf(msg, sizeof(msg), "Cannot find program %d version %d", (int)h->prog, (int)h->vers);
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, msg);
        return;
    }
    const struct vm_proc_info *info = vm_proc_lookup(h->prog, h->proc);
    size_t argn = h->len - VM_HDR_LEN;
    /* Before the listener's authentication is done only the auth procedures are answered
     * (keepalive never gets here); nothing else is looked at, let alone forwarded. */
    if (!s->authed && !(h->prog == VM_PROG_REMOTE &&
                        (h->proc == VM_PROC_AUTH_LIST || (info && info->kind == VM_PK_AUTH)))) {
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "authentication required");
        return;
    }

    if (h->prog == VM_PROG_REMOTE) {
        /* Small argument blocks only: these are all a few words long. */
        uint8_t args[MAX_NAME_LEN + 16];
        size_t take = argn < sizeof(args) ? argn : sizeof(args);
        switch (h->proc) {
        case VM_PROC_AUTH_LIST:
            if (s->state == S_NEW || s->state == S_OPEN) {
                struct xbuf b;
                xb_init(&b);
                xb_u32(&b, 1);
                xb_u32(&b, session_uses_sasl(s) ? 1 : 0); /* REMOTE_AUTH_SASL / REMOTE_AUTH_NONE */
                wire_put_reply(session_out(s), h, b.p, b.len);
                xb_free(&b);
            }
            return;
        case VM_PROC_CONNECT_SUPPORTS_FEATURE:
            {
                /* Copy, not remove: a driver feature is forwarded as it came. */
                struct evbuffer_ptr pos;
                evbuffer_ptr_set(pkt, &pos, VM_HDR_LEN, EVBUFFER_PTR_SET);
                evbuffer_copyout_from(pkt, &pos, args, take);
            }
            handle_feature(s, h, pkt, args, take);
            return;
        case VM_PROC_CONNECT_OPEN:
            if (argn > sizeof(args)) {
                session_reply_error(s, h, VIR_ERR_INVALID_ARG, VIR_FROM_RPC,
                                    "invalid argument: connection name too long");
                return;
            }
            evbuffer_drain(pkt, VM_HDR_LEN);
            evbuffer_remove(pkt, args, argn);
            handle_open(s, h, args, argn);
            return;
        case VM_PROC_CONNECT_CLOSE:
            /* Flag first: with the SASL layer the reply is encoded at once and the write
             * callback that ends the session may run inside wire_put_reply. */
            s->close_after_flush = 1;
            s->close_reason = "client closed the connection (CONNECT_CLOSE)";
            bufferevent_disable(s->bev, EV_READ);
            wire_put_reply(session_out(s), h, NULL, 0);
            return;
        case VM_PROC_CONNECT_GET_URI:
            if (require_open(s, h)) {
                struct xbuf b;
                xb_init(&b);
                xb_string(&b, s->opened_name[0] ? s->opened_name : s->route.name);
                wire_put_reply(session_out(s), h, b.p, b.len);
                xb_free(&b);
            }
            return;
        case VM_PROC_CONNECT_REGISTER_CLOSE_CALLBACK:
        case VM_PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK:
            if (require_open(s, h)) {
                s->close_cb = h->proc == VM_PROC_CONNECT_REGISTER_CLOSE_CALLBACK;
                wire_put_reply(session_out(s), h, NULL, 0);
            }
            return;
        case VM_PROC_CONNECT_SET_IDENTITY: {
            const char *why = "operation forbidden: CONNECT_SET_IDENTITY would change the "
                              "identity of a shared upstream connection; virtmux does not "
                              "forward it";
            audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, "CONNECT_SET_IDENTITY",
                         s->route.upstream ? s->route.upstream->name : NULL, why);
            session_reply_error(s, h, VIR_ERR_OPERATION_DENIED, VIR_FROM_NONE, why);
            return;
        }
        default:
            break;
        }
        if (info && info->kind == VM_PK_AUTH) {
            session_handle_auth(s, h, pkt);
            return;
        }
    }

    if (!require_open(s, h))
        return;
    if (s->readonly) {
        int domain;
        if (!policy_readonly_allows(h, pkt, msg, sizeof(msg), &domain)) {
            char pname[32];
            snprintf(pname, sizeof(pname), "%s_PROC_%d",
                     h->prog == VM_PROG_QEMU ? "QEMU" : h->prog == VM_PROG_LXC ? "LXC" : "REMOTE",
                     h->proc);
            audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, info ? info->name : pname,
                         s->route.upstream->name, msg);
            session_reply_error(s, h, VIR_ERR_OPERATION_DENIED, domain, msg);
            return;
        }
    }
    if (info && (info->kind == VM_PK_EVENT_REGISTER || info->kind == VM_PK_EVENT_DEREGISTER)) {
        handle_event_call(s, h, pkt, info);
        return;
    }
    if (info && info->kind == VM_PK_STREAM_CREATE) {
        stream_start(s, s->pool, h, pkt);
        return;
    }
    if (info && (info->fds_in || info->fds_out)) {
        refuse(s, h, "file descriptor passing is not possible", info);
        return;
    }

    forward_call(s, h, pkt);
}

/* One whole packet from the client, in `pkt` (freed by the caller). */
static void handle_packet(struct vm_session *s, struct evbuffer *pkt)
{
    struct vm_hdr h;
    wire_hdr_peek(pkt, &h);
    keepalive_touch(&s->ka);

    if (h.prog == VM_PROG_KEEPALIVE) {
        if (h.type != VM_MESSAGE || h.vers != VM_PROG_VERSION ||
            (h.proc != VM_PROC_KEEPALIVE_PING && h.proc != VM_PROC_KEEPALIVE_PONG)) {
            session_close(s, "malformed keepalive packet");
            return;
        }
        if (h.proc == VM_PROC_KEEPALIVE_PING)
            wire_put_keepalive(session_out(s), VM_PROC_KEEPALIVE_PONG);
        return;
    }

    switch (h.type) {
    case VM_CALL:
        handle_call(s, &h, pkt);
        return;
    case VM_CALL_WITH_FDS: {
        /* The FDs follow out of band, each with one dummy byte after the packet: discard
         * those bytes (the kernel drops the descriptors we never receive) and refuse. */
        uint8_t w[4] = {0};
        struct evbuffer_ptr pos;
        evbuffer_ptr_set(pkt, &pos, VM_HDR_LEN, EVBUFFER_PTR_SET);
        evbuffer_copyout_from(pkt, &pos, w, sizeof(w));
        uint32_t nfds = (uint32_t)w[0] << 24 | (uint32_t)w[1] << 16 | (uint32_t)w[2] << 8 | w[3];
        if (h.len < VM_HDR_LEN + 4 || nfds > 32 || (s->is_tcp && nfds)) {
            session_close(s, "bad CALL_WITH_FDS packet");
            return;
        }
        s->skip_bytes = nfds;
        session_reply_error(s, &h, VIR_ERR_NO_SUPPORT, VIR_FROM_RPC,
                            "this function is not supported by the connection driver: "
                            "file descriptor passing through virtmux");
        return;
    }
    case VM_STREAM:
    case VM_STREAM_HOLE:
        if (stream_client_packet(s, &h, pkt) == 0)
            return;
        vm_debug(s->tag, "stream packet for unknown serial %u dropped", h.serial);
        return;
    case VM_REPLY:
    case VM_MESSAGE:
    case VM_REPLY_WITH_FDS:
        /* libvirtd silently drops these from a client; so do we. */
        vm_debug(s->tag, "dropped packet type %u proc %d", h.type, h.proc);
        return;
    default: {
        char why[64];
        snprintf(why, sizeof(why), "unknown packet type %u", h.type);
        session_close(s, why);
        return;
    }
    }
}

static void process_input(struct vm_session *s)
{
    while (s->state != S_CLOSING && !s->paused && !s->close_after_flush) {
        /* Fetched each time: the SASL security layer may replace the bufferevent. */
        struct evbuffer *in = bufferevent_get_input(s->bev);
        if (s->skip_bytes) {
            size_t n = evbuffer_get_length(in);
            if (!n)
                break;
            size_t k = n < s->skip_bytes ? n : s->skip_bytes;
            evbuffer_drain(in, k);
            s->skip_bytes -= (uint32_t)k;
            continue;
        }
        uint32_t len;
        int r = wire_frame_ready(in, &len);
        if (r < 0) {
            char why[80];
            uint8_t w[4];
            evbuffer_copyout(in, w, 4);
            snprintf(why, sizeof(why), "illegal length word 0x%02x%02x%02x%02x", w[0], w[1], w[2],
                     w[3]);
            session_close(s, why);
            return;
        }
        if (r == 0)
            break;
        struct evbuffer *pkt = evbuffer_new();
        if (!pkt)
            abort();
        evbuffer_remove_buffer(in, pkt, len);
        handle_packet(s, pkt);
        evbuffer_free(pkt);
    }
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
    process_input(arg);
}

void session_read_cb(struct bufferevent *bev, void *arg)
{
    process_input(arg);
}

void session_write_cb(struct bufferevent *bev, void *arg)
{
    struct vm_session *s = arg;
    if (s->close_after_flush && evbuffer_get_length(session_out(s)) == 0) {
        session_close(s, s->close_reason);
        return;
    }
    stream_session_drained(s);
    update_flow(s);
}

void session_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct vm_session *s = arg;
    if ((what & BEV_EVENT_CONNECTED) && s->state == S_TLS) {
        session_tls_established(s);
        return;
    }
    if (what & BEV_EVENT_EOF)
        session_close(s, "client hung up");
    else if (what & BEV_EVENT_ERROR)
        session_close(s, evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
}

void session_new(struct vm_gateway *gw, const struct vm_listener_cfg *lcfg, evutil_socket_t fd,
                 const char *peer, const struct vm_identity *id, SSL_CTX *tls)
{
    struct vm_session *s = vm_calloc(1, sizeof(*s));
    s->gw = gw;
    s->lcfg = lcfg;
    s->id = gateway_next_id(gw);
    s->is_tcp = !id->is_unix;
    s->ident = *id;
    identity_str(&s->ident, s->ident_str, sizeof(s->ident_str));
    TAILQ_INIT(&s->calls);
    TAILQ_INIT(&s->subs);
    TAILQ_INIT(&s->streams);
    snprintf(s->tag, sizeof(s->tag), "C#%u %s", s->id, peer);
    if (tls) {
        s->ssl = SSL_new(tls);
        if (!s->ssl)
            abort();
        s->bev = bufferevent_openssl_socket_new(gateway_base(gw), fd, s->ssl,
                                                BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
        s->state = S_TLS;
    } else {
        s->bev = bufferevent_socket_new(gateway_base(gw), fd, BEV_OPT_CLOSE_ON_FREE);
        s->state = S_NEW;
        s->authed = lcfg->auth == VM_AUTH_NONE || lcfg->auth == VM_AUTH_PEER;
    }
    s->kick = event_new(gateway_base(gw), -1, 0, kick_cb, s);
    if (!s->bev || !s->kick)
        abort();
    bufferevent_setcb(s->bev, session_read_cb, session_write_cb, session_event_cb, s);
    bufferevent_setwatermark(s->bev, EV_WRITE, OUT_LOW, 0);
    evbuffer_add_cb(bufferevent_get_output(s->bev), session_output_cb, s);
    bufferevent_enable(s->bev, EV_READ);
    gateway_session_opened(gw, s);
    if (!s->authed) {
        /* Unauthenticated clients are bounded in number and in time. */
        if (gateway_unauth_acquire(gw) < 0) {
            vm_warn(s->tag, "refused: max_unauthenticated (%d) clients are authenticating",
                    gateway_config(gw)->max_unauthenticated);
            session_close(s, "too many unauthenticated clients");
            return;
        }
        s->unauth_slot = 1;
        s->auth_timer = evtimer_new(gateway_base(gw), session_auth_timeout_cb, s);
        struct timeval tv = {gateway_config(gw)->auth_timeout_s, 0};
        if (!s->auth_timer || evtimer_add(s->auth_timer, &tv) < 0)
            abort();
    }
    vm_info(s->tag, "connected on listener %s as %s", lcfg->name, s->ident_str);
}

static void session_free(void *p)
{
    struct vm_session *s = p;
    auth_free(s->auth);
    free(s->runs);
    free(s->opened_name);
    route_clear(&s->route);
    free(s);
}

void session_close(struct vm_session *s, const char *why)
{
    if (s->state == S_CLOSING)
        return;
    enum session_state was = s->state;
    s->state = S_CLOSING;
    vm_info(s->tag, "closed: %s (%d calls outstanding)", why, s->noutstanding);

    struct vm_call *c;
    while ((c = TAILQ_FIRST(&s->calls))) {
        struct vm_link *inflight = c->link;
        call_detach(c); /* swallowed: the late reply is dropped */
        if (!inflight) {
            pool_cancel_call(s->pool, c);
            call_free(c);
        }
    }
    struct vm_pool *p = s->pool;
    stream_session_gone(s);
    if (p)
        events_session_gone(pool_events(p), s);
    if (was == S_OPENING)
        pool_cancel_open(p, s);
    if (s->home)
        pool_release(p, s->home);
    s->home = NULL;
    keepalive_stop(&s->ka);
    session_release_unauth(s);
    event_free(s->kick);
    s->kick = NULL;
    watch_hangup(s, 0);
    bufferevent_free(s->bev);
    s->bev = NULL;
    gateway_session_closed(s->gw, s);
    if (s->rule_held)
        gateway_rule_release(s->gw, s->rule);
    if (p)
        gateway_pool_check(s->gw, p);
    gateway_defer_free(s->gw, session_free, s);
}
