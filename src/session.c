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

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "audit.h"
#include "auth.h"
#include "cache.h"
#include "call.h"
#include "config.h"
#include "conn.h"
#include "events.h"
#include "env.h"
#include "grant.h"
#include "reap.h"
#include "identity.h"
#include "keepalive.h"
#include "log.h"
#include "metrics.h"
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


static const struct vm_conn_ops session_conn_ops;

static void update_flow(struct vm_session *s);

/* ---- the client as events and streams see it (vm_peer ops) ---- */

static struct vm_session *of_peer(struct vm_peer *c)
{
    return (struct vm_session *)((char *)c - offsetof(struct vm_session, peer));
}

static struct evbuffer *peer_output(struct vm_peer *c)
{
    return conn_output(of_peer(c)->conn);
}

static int peer_output_full(struct vm_peer *c)
{
    return evbuffer_get_length(peer_output(c)) > OUT_HIGH;
}

static void peer_request_begin(struct vm_peer *c)
{
    struct vm_session *s = of_peer(c);
    s->noutstanding++;
    update_flow(s);
}

static void drain_check(struct vm_session *s);

static void peer_request_end(struct vm_peer *c)
{
    struct vm_session *s = of_peer(c);
    s->noutstanding--;
    update_flow(s);
    drain_check(s);
}

static void peer_block_reading(struct vm_peer *c, int on)
{
    struct vm_session *s = of_peer(c);
    s->blocked += on ? 1 : -1;
    update_flow(s);
}

static int peer_push_event(struct vm_peer *c, const void *pkt, size_t len)
{
    struct vm_session *s = of_peer(c);
    if (s->grant && len >= VM_HDR_LEN) {
        struct vm_hdr h;
        wire_hdr_decode(pkt, &h);
        if (!grant_event_allowed(s->grant, vm_proc_lookup(h.prog, h.proc), pkt, len))
            return 0; /* about a domain outside the grant: not for this subscriber */
    }
    if (s->event_bytes + len > (size_t)s->env->cfg->event_queue_bytes)
        return -1;
    s->adding_event = 1;
    evbuffer_add(conn_output(s->conn), pkt, len);
    s->adding_event = 0;
    return 0;
}

static void peer_close(struct vm_peer *c, const char *why)
{
    session_close(of_peer(c), why);
}

static const struct vm_peer_ops session_peer_ops = {
    .output = peer_output,
    .push_event = peer_push_event,
    .output_full = peer_output_full,
    .block_reading = peer_block_reading,
    .request_begin = peer_request_begin,
    .request_end = peer_request_end,
    .close = peer_close,
};

/* Track what enters and leaves the client's output buffer (see `runs`). */
static void session_output_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
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

void session_view(const struct vm_session *s, struct vm_session_view *v)
{
    static const char *const states[] = {
        [S_TLS] = "authenticating", [S_NEW] = "new", [S_OPENING] = "opening",
        [S_OPEN] = "open", [S_CLOSING] = "closing",
    };
    *v = (struct vm_session_view){
        .id = s->id,
        .identity = s->ident_str,
        .listener = s->lcfg->name,
        .peer = s->peer_name,
        .upstream = s->route.upstream ? s->route.upstream->name : NULL,
        .state = !s->authed && s->state == S_NEW ? "authenticating" : states[s->state],
        .since = (long long)s->since,
        .calls = (unsigned long long)s->ncalls,
        .outstanding = s->noutstanding,
        .readonly = s->state == S_OPEN && s->readonly,
    };
}

unsigned session_id(const struct vm_session *s)
{
    return s->id;
}

const char *session_tag(const struct vm_session *s)
{
    return s->tag;
}

struct vm_link *session_home(const struct vm_session *s)
{
    return s->home;
}

int session_outstanding(const struct vm_session *s)
{
    return s->noutstanding;
}

const struct vm_listener_cfg *session_listener(const struct vm_session *s)
{
    return s->lcfg;
}

const struct vm_rule *session_rule(const struct vm_session *s)
{
    return s->rule;
}

const struct vm_upstream_cfg *session_upstream(const struct vm_session *s)
{
    return s->route.upstream;
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
        wire_put_packet(session_out(s), VM_PROG_REMOTE,
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
    conn_pause(s->conn, 1);
    if (conn_output_length(s->conn) == 0)
        session_close(s, "upstream lost for good");
}


int session_rehome(struct vm_session *s)
{
    if (s->state != S_OPEN || !s->home)
        return -1;
    struct vm_link *to = pool_rehome(s->pool, s->home);
    if (!to)
        return -1;
    struct vm_link *old = s->home;
    s->home = to;
    vm_info(s->tag, "home %s lost for good: now %s", link_tag(old), link_tag(to));
    pool_release(s->pool, old); /* may free `old` */
    return 0;
}

int session_idle(const struct vm_session *s)
{
    return s->noutstanding == 0 && s->state != S_OPENING;
}

/* Draining and idle: hang up once the last reply is written, as after CONNECT_CLOSE. This
 * runs inside pool, link, events and stream callbacks, so it never closes the session
 * itself: the write that empties the output does (on_drained), or the gateway's next
 * session_drain when there was nothing left to write. */
static void drain_check(struct vm_session *s)
{
    if (!s->draining || !session_idle(s) || s->state == S_CLOSING || s->close_after_flush)
        return;
    s->close_after_flush = 1;
    s->close_reason = "virtmux is shutting down (drained)";
    conn_pause(s->conn, 1);
}

void session_drain(struct vm_session *s)
{
    if (s->state == S_CLOSING)
        return;
    s->draining = 1;
    drain_check(s);
    if (s->close_after_flush && conn_output_length(s->conn) == 0)
        session_close(s, s->close_reason);
}

/* During a drain a call that would reach an upstream is answered here instead: clients get a
 * clear error rather than a call that a stopping gateway may cut off half-way. */
static int refuse_draining(struct vm_session *s, const struct vm_hdr *h)
{
    if (!s->draining)
        return 0;
    session_reply_error(s, h, VIR_ERR_OPERATION_FAILED, VIR_FROM_RPC,
                        "operation failed: virtmux is shutting down and takes no new calls");
    return 1;
}

static void reply_u32(struct vm_session *s, const struct vm_hdr *h, uint32_t v)
{
    struct xbuf b;
    xb_init(&b);
    xb_u32(&b, v);
    wire_put_reply(session_out(s), h, b.p, b.len);
    xb_free(&b);
}

/* Pause or resume reading from the client according to its load. */
static void update_flow(struct vm_session *s)
{
    if (s->state == S_CLOSING || s->close_after_flush)
        return;
    int max = s->env->cfg->max_client_requests;
    size_t out = evbuffer_get_length(session_out(s));
    /* Calls are bounded in number and in bytes: 16 calls of 32 MiB would otherwise let one
     * client park half a gigabyte in the gateway. */
    int busy = s->noutstanding >= max || s->outstanding_bytes > OUTSTANDING_BYTES_MAX ||
               out > OUT_HIGH || s->blocked > 0;
    if (busy && !conn_paused(s->conn)) {
        /* Counted when reading stops, by the first bound that stopped it. */
        enum vm_limit why = s->noutstanding >= max ? VM_LIMIT_MAX_CLIENT_REQUESTS
                            : s->outstanding_bytes > OUTSTANDING_BYTES_MAX
                                ? VM_LIMIT_OUTSTANDING_BYTES
                            : out > OUT_HIGH ? VM_LIMIT_CLIENT_OUTPUT
                                             : VM_LIMIT_STREAM_UPLOAD;
        metrics_limit(s->env->metrics, why);
    }
    if (busy)
        conn_pause(s->conn, 1);
    else if (out <= OUT_LOW)
        conn_pause(s->conn, 0);
}

/* ---- calls ---- */

static void call_detach(struct vm_session *s, struct vm_call *c)
{
    TAILQ_REMOVE(&s->calls, c, sentry);
    s->noutstanding--;
    s->outstanding_bytes -= c->hdr.len;
}

/* A forwarded call ended: its reply (serial put back to the client's) or our error. */
/* A call that may change something upstream went through (and again when it is answered: a
 * read that ran before the write but comes back after it must not be cached either). */
static int is_write(const struct vm_session *s, const struct vm_proc_info *info)
{
    return !s->readonly && (!info || (info->ro != VM_RO_YES &&
                                      (info->kind == VM_PK_CALL ||
                                       info->kind == VM_PK_STREAM_CREATE)));
}

static void call_done(void *arg, struct vm_call *c, const struct vm_hdr *reply,
                      struct evbuffer *pkt, const struct vm_call_error *err)
{
    struct vm_session *s = arg;
    const struct vm_proc_info *info = vm_proc_lookup(c->hdr.prog, c->hdr.proc);
    if (is_write(s, info))
        s->host->ops->upstream_write(s->host->owner, s->route.upstream);
    metrics_call(s->env->metrics, s->mup, info, c->t0_ns);
    if (reply && reply->status == VM_STATUS_ERROR)
        metrics_error(s->env->metrics, VM_ERRK_UPSTREAM);
    if (reply && c->grant_filter && s->grant) {
        struct vm_grant_memo memo = {c->grant_aux, c->grant_note};
        grant_filter_reply(s->grant, info, &memo, &c->hdr, pkt, session_out(s));
    } else if (reply) {
        wire_set_serial(pkt, c->hdr.serial);
        evbuffer_add_buffer(session_out(s), pkt);
    } else {
        session_reply_error(s, &c->hdr, err->code, err->domain, err->message);
    }
    call_detach(s, c);
    update_flow(s);
    drain_check(s);
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

/* The upstream a route names: configured, or still to be made from a template. */
static const char *route_upstream_name(const struct vm_route *r)
{
    return r->upstream ? r->upstream->name : r->upname;
}

/* Refuse a routed CONNECT_OPEN for a policy reason: audit, answer 88, forget the route. */

static void deny_open(struct vm_session *s, const struct vm_hdr *h, const char *err, char *name)
{
    audit_denied(s->env->audit, s->tag, s->ident_str, "CONNECT_OPEN",
                 route_upstream_name(&s->route), err);
    session_reply_error(s, h, VIR_ERR_ACCESS_DENIED, VIR_FROM_ACCESS, err);
    route_clear(&s->route);
    free(name);
}

static void open_done(struct vm_open_wait *w, struct vm_link *home, const void *err_payload,
                      size_t n, const char *message);

static void handle_open(struct vm_session *s, const struct vm_hdr *h, const uint8_t *args, size_t n)
{
    if (s->state != S_NEW) {
        session_reply_error(s, h, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC,
                            "internal error: connection already open");
        return;
    }
    if (refuse_draining(s, h))
        return;
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
    const struct vm_config *cfg = s->env->cfg;
    const struct vm_rule *rule = policy_match(cfg, &s->ident);
    if (rule->deny) {
        snprintf(err, sizeof(err), "access denied: virtmux policy does not admit %s",
                 s->ident_str);
        audit_denied(s->env->audit, s->tag, s->ident_str, "CONNECT_OPEN", NULL, err);
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
    if (!policy_allows_upstream(rule, route_upstream_name(&s->route))) {
        snprintf(err, sizeof(err), "access denied: virtmux policy does not let %s reach "
                 "upstream %s", s->ident_str, route_upstream_name(&s->route));
        deny_open(s, h, err, name);
        return;
    }
    if (!s->rule_held) {
        if (s->host->ops->rule_acquire(s->host->owner, rule) < 0) {
            metrics_limit(s->env->metrics, VM_LIMIT_RULE_MAX_SESSIONS);
            snprintf(err, sizeof(err), "access denied: %s already has the %d sessions its "
                     "virtmux policy allows", s->ident_str, rule->max_sessions);
            deny_open(s, h, err, name);
            return;
        }
        s->rule = rule;
        s->rule_held = 1;
    }
    int readonly = (flags & 1) || rule->readonly || s->lcfg->readonly;
    if (s->route.tpl) {
        /* Made (or found) only now, once policy let this client reach it. */
        struct vm_pool *p = s->host->ops->template_pool(s->host->owner, s->route.tpl,
                                                        s->route.upname, s->route.name,
                                                        readonly, err, sizeof(err));
        if (!p) {
            vm_info(s->tag, "open \"%s\" refused: %s", name, err);
            session_reply_error(s, h, VIR_ERR_NO_CONNECT, VIR_FROM_NONE, err);
            route_clear(&s->route);
            free(name);
            return;
        }
        s->route.upstream = pool_upstream(p);
        s->pool = p;
    }
    free(s->opened_name);
    s->opened_name = name;
    s->readonly = readonly;
    grant_free(s->grant);
    s->grant = grant_new(rule->domains, rule->networks, rule->storage_pools, s->route.name);
    s->open_hdr = *h;
    s->state = S_OPENING;
    if (!s->pool)
        s->pool = s->host->ops->pool(s->host->owner, s->route.upstream, s->route.name,
                                     s->readonly);
    s->mup = metrics_upstream(s->env->metrics, s->route.upstream->name);
    vm_info(s->tag, "open \"%s\" -> upstream %s as \"%s\"%s", name, s->route.upstream->name,
            s->route.name, s->readonly ? " (read-only)" : "");
    s->open_wait.done = open_done;
    pool_open(s->pool, &s->open_wait);
}

/* The pool answered our CONNECT_OPEN (w is s->open_wait). */
static void open_done(struct vm_open_wait *w, struct vm_link *home, const void *err_payload,
                      size_t n, const char *message)
{
    struct vm_session *s = (struct vm_session *)((char *)w - offsetof(struct vm_session, open_wait));
    if (home) {
        s->home = home;
        s->state = S_OPEN;
        wire_put_reply(session_out(s), &s->open_hdr, NULL, 0);
        vm_debug(s->tag, "open: home %s", link_tag(home));
        drain_check(s);
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
    s->host->ops->pool_check(s->host->owner, p);
    drain_check(s);
}

/* ---- dispatch ---- */

/* Hand a call to the pool; the packet moves into the call record. */
static void forward_call(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt,
                         int grant_filter, const struct vm_grant_memo *memo)
{
    if (refuse_draining(s, h))
        return;
    struct vm_call *c = call_new(call_done, s, 0);
    c->hdr = *h;
    c->grant_filter = (uint8_t)grant_filter;
    if (memo) {
        c->grant_aux = memo->aux;
        c->grant_note = memo->note;
    }
    c->fair = &s->fair;
    c->t0_ns = metrics_now_ns();
    s->ncalls++;
    evbuffer_add_buffer(c->pkt, pkt);
    TAILQ_INSERT_TAIL(&s->calls, c, sentry);
    s->noutstanding++;
    s->outstanding_bytes += h->len;
    /* Coalescing and the micro-cache may answer it, park it on an identical call in flight,
     * or hand back the shared call to send instead. */
    struct vm_call *up = cache_call(pool_cache(s->pool), c);
    if (up)
        pool_submit(s->pool, s->home, up);
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
    const struct vm_config *cfg = s->env->cfg;
    switch (feature) {
    case VM_FEATURE_PROGRAM_KEEPALIVE:
        /* Per hop, and valid before OPEN. The client has a keepalive handler: we may PING. */
        reply_u32(s, h, 1);
        if (!s->ka.timer && keepalive_start(&s->ka, s->env->base, cfg->keepalive_interval_s,
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
    forward_call(s, h, pkt, 0, NULL);
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
    if (n > EVENT_ARGS_MAX) {
        metrics_limit(s->env->metrics, VM_LIMIT_EVENT_ARGS);
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "Unable to decode message payload");
        return;
    }
    uint8_t *args = evbuffer_pullup(pkt, -1) + VM_HDR_LEN;
    if (info->kind == VM_PK_EVENT_REGISTER) {
        if (refuse_draining(s, h))
            return;
        events_subscribe(pool_events(s->pool), &s->peer, h, args, n);
        return;
    }
    struct xrd r;
    xr_init(&r, args, n);
    int32_t id = xr_i32(&r);
    if (r.err) {
        session_reply_error(s, h, VIR_ERR_RPC, VIR_FROM_RPC, "Unable to decode message payload");
        return;
    }
    events_unsubscribe(pool_events(s->pool), &s->peer, h, id);
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
                metrics_limit(s->env->metrics, VM_LIMIT_NAME_LENGTH);
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
            conn_pause(s->conn, 1);
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
            audit_denied(s->env->audit, s->tag, s->ident_str, "CONNECT_SET_IDENTITY",
                         s->route.upstream ? s->route.upstream->name : NULL, why);
            session_reply_error(s, h, VIR_ERR_OPERATION_DENIED, VIR_FROM_NONE, why);
            return;
        }
        default:
            break;
        }
        if (info && info->kind == VM_PK_AUTH) {
            if (session_handle_auth(s, h, pkt) < 0)
                session_close(s, "cannot start the SASL security layer");
            return;
        }
    }

    if (!require_open(s, h))
        return;
    if (s->readonly) {
        int domain;
        if (!policy_readonly_allows(h, pkt, msg, sizeof(msg), &domain)) {
            char pname[32];
            audit_denied(s->env->audit, s->tag, s->ident_str,
                         vm_proc_name(h->prog, h->proc, pname, sizeof(pname)),
                         s->route.upstream->name, msg);
            session_reply_error(s, h, VIR_ERR_OPERATION_DENIED, domain, msg);
            return;
        }
    }
    int grant_filter = 0;
    struct vm_grant_memo memo = {0, NULL};
    if (s->grant && info) {
        struct vm_grant_error ge;
        enum vm_grant_verdict v = grant_check_call(s->grant, info, pkt, &memo, &ge);
        if (v == VM_GRANT_REFUSED) {
            audit_denied(s->env->audit, s->tag, s->ident_str, info->name,
                         s->route.upstream->name, ge.message);
            wire_put_error_full(session_out(s), h, ge.code, ge.domain, ge.message,
                                ge.str1[0] ? ge.str1 : NULL, ge.str2[0] ? ge.str2 : NULL);
            return;
        }
        grant_filter = v == VM_GRANT_FILTER;
    }
    if (is_write(s, info))
        s->host->ops->upstream_write(s->host->owner, s->route.upstream);
    if (info && (info->kind == VM_PK_EVENT_REGISTER || info->kind == VM_PK_EVENT_DEREGISTER)) {
        handle_event_call(s, h, pkt, info);
        return;
    }
    if (info && info->kind == VM_PK_STREAM_CREATE) {
        if (refuse_draining(s, h))
            return;
        stream_start(&s->peer, s->pool, h, pkt);
        return;
    }
    if (info && (info->fds_in || info->fds_out)) {
        refuse(s, h, "file descriptor passing is not possible", info);
        return;
    }

    forward_call(s, h, pkt, grant_filter, &memo);
}

/* One whole packet from the client, in `pkt` (freed by the caller). */
static void handle_packet(struct vm_session *s, const struct vm_hdr *hp, struct evbuffer *pkt)
{
    struct vm_hdr h = *hp;
    keepalive_touch(&s->ka);

    if (h.prog == VM_PROG_KEEPALIVE) {
        if (h.type != VM_MESSAGE || h.vers != VM_PROG_VERSION ||
            (h.proc != VM_PROC_KEEPALIVE_PING && h.proc != VM_PROC_KEEPALIVE_PONG)) {
            metrics_error(s->env->metrics, VM_ERRK_PROTOCOL);
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
            metrics_error(s->env->metrics, VM_ERRK_PROTOCOL);
            session_close(s, "bad CALL_WITH_FDS packet");
            return;
        }
        conn_skip(s->conn, nfds);
        session_reply_error(s, &h, VIR_ERR_NO_SUPPORT, VIR_FROM_RPC,
                            "this function is not supported by the connection driver: "
                            "file descriptor passing through virtmux");
        return;
    }
    case VM_STREAM:
    case VM_STREAM_HOLE:
        if (stream_client_packet(&s->peer, &h, pkt) == 0)
            return;
        vm_debug(s->tag, "stream packet for unknown serial %u dropped", h.serial);
        return;
    case VM_REPLY:
    case VM_MESSAGE:
    case VM_REPLY_WITH_FDS:
        /* libvirtd silently drops these from a client; so do we. */
        vm_debug(s->tag, "dropped packet type %u %s", h.type,
                 vm_proc_name(h.prog, h.proc, (char[32]){0}, 32));
        return;
    default: {
        char why[64];
        snprintf(why, sizeof(why), "unknown packet type %u", h.type);
        metrics_error(s->env->metrics, VM_ERRK_PROTOCOL);
        session_close(s, why);
        return;
    }
    }
}

/* ---- the client connection (vm_conn ops) ---- */

static int on_packet(void *owner, struct vm_conn *c, const struct vm_hdr *h, struct evbuffer *pkt)
{
    struct vm_session *s = owner;
    handle_packet(s, h, pkt);
    if (s->state == S_CLOSING)
        return -1;
    /* Every packet may have added output (a local answer, an error, a PONG): a client that
     * sends but never reads is stopped here, whatever it sent. */
    update_flow(s);
    return 0;
}

static void on_bad_length(void *owner, struct vm_conn *c, const uint8_t w[4])
{
    char why[80];
    snprintf(why, sizeof(why), "illegal length word 0x%02x%02x%02x%02x", w[0], w[1], w[2], w[3]);
    struct vm_session *s = owner;
    metrics_limit(s->env->metrics, VM_LIMIT_FRAME_LENGTH);
    metrics_error(s->env->metrics, VM_ERRK_PROTOCOL);
    session_close(s, why);
}

static void auth_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_session *s = arg;
    metrics_limit(s->env->metrics, VM_LIMIT_AUTH_TIMEOUT);
    audit_denied(s->env->audit, s->tag, s->ident_str, "AUTH", NULL,
                 "did not authenticate within auth_timeout_s");
    session_close(s, "authentication timed out");
}

static void on_drained(void *owner, struct vm_conn *c)
{
    struct vm_session *s = owner;
    if (s->close_after_flush && evbuffer_get_length(session_out(s)) == 0) {
        session_close(s, s->close_reason);
        return;
    }
    stream_peer_drained(&s->peer);
    update_flow(s);
}

static void on_event(void *owner, struct vm_conn *c, short what)
{
    struct vm_session *s = owner;
    if ((what & BEV_EVENT_CONNECTED) && s->state == S_TLS) {
        char err[600];
        if (session_tls_established(s, err, sizeof(err)) < 0)
            session_close(s, err); /* no 0x01: the client reports the refusal */
        return;
    }
    if (what & BEV_EVENT_EOF)
        session_close(s, "client hung up");
    else if (what & BEV_EVENT_ERROR)
        session_close(s, evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
}

static const struct vm_conn_ops session_conn_ops = {
    .packet = on_packet,
    .drained = on_drained,
    .event = on_event,
    .bad_length = on_bad_length,
};

void session_new(const struct vm_session_host *host, const struct vm_listener_cfg *lcfg,
                 evutil_socket_t fd, const char *peer, const struct vm_identity *id,
                 SSL_CTX *tls)
{
    struct vm_session *s = vm_calloc(1, sizeof(*s));
    s->host = host;
    s->env = host->env;
    s->lcfg = lcfg;
    s->id = env_next_id(s->env);
    s->is_tcp = !id->is_unix;
    s->ident = *id;
    identity_str(&s->ident, s->ident_str, sizeof(s->ident_str));
    identity_source(&s->ident, s->source, sizeof(s->source));
    TAILQ_INIT(&s->calls);
    TAILQ_INIT(&s->fair.calls);
    s->peer.ops = &session_peer_ops;
    s->peer.tag = s->tag;
    TAILQ_INIT(&s->peer.subs);
    TAILQ_INIT(&s->peer.streams);
    snprintf(s->tag, sizeof(s->tag), "C#%u %s", s->id, peer);
    s->peer_name = strchr(s->tag, ' ') + 1;
    s->since = time(NULL);
    s->mup = -1;
    s->mlis = metrics_listener(s->env->metrics, lcfg->name);
    metrics_session_accepted(s->env->metrics, s->mlis);
    struct bufferevent *bev;
    if (tls) {
        s->ssl = SSL_new(tls);
        if (!s->ssl)
            abort();
        bev = bufferevent_openssl_socket_new(s->env->base, fd, s->ssl,
                                             BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
        s->state = S_TLS;
    } else {
        bev = bufferevent_socket_new(s->env->base, fd, BEV_OPT_CLOSE_ON_FREE);
        s->state = S_NEW;
        s->authed = lcfg->auth == VM_AUTH_NONE || lcfg->auth == VM_AUTH_PEER;
    }
    if (!bev)
        abort();
    s->conn = conn_new(bev, &session_conn_ops, s, tls ? 0 : VM_CONN_PLAIN | VM_CONN_CONNECTED);
    conn_count_bytes(s->conn, metrics_listener_bytes(s->env->metrics, s->mlis));
    conn_set_low_mark(s->conn, OUT_LOW);
    conn_watch_output(s->conn, session_output_cb, s);
    host->ops->opened(host->owner, s);
    if (!s->authed) {
        const char *why = session_hold_unauth(s);
        if (why) {
            session_close(s, why);
            return;
        }
        s->auth_timer = evtimer_new(s->env->base, auth_timeout_cb, s);
        struct timeval tv = {s->env->cfg->auth_timeout_s, 0};
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
    grant_free(s->grant);
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
        call_detach(s, c);
        call_swallow(c); /* the late reply is dropped */
        if (!inflight && !c->parked) { /* a parked call is ended (freed) by its shared call */
            pool_cancel_call(s->pool, c);
            call_free(c);
        }
    }
    struct vm_pool *p = s->pool;
    stream_peer_gone(&s->peer);
    if (p)
        events_peer_gone(pool_events(p), &s->peer);
    if (was == S_OPENING)
        pool_cancel_open(p, &s->open_wait);
    if (s->home)
        pool_release(p, s->home);
    s->home = NULL;
    keepalive_stop(&s->ka);
    session_release_unauth(s);
    conn_free(s->conn);
    s->conn = NULL;
    s->host->ops->closed(s->host->owner, s);
    if (s->rule_held)
        s->host->ops->rule_release(s->host->owner, s->rule);
    if (p)
        s->host->ops->pool_check(s->host->owner, p);
    reaper_defer(s->env->reaper, session_free, s);
}
