/*
 *   listeners --accept--> sessions --CONNECT_OPEN--> gateway_pool(upstream, name, ro)
 *                                          |           |
 *                    (a template's name) --+--> dyn_upstream (made on first use,
 *                                          |     freed with its last pool)
 *                                                    pools --> links --> libvirtd
 *
 * The gateway owns listeners and pools. Sessions own themselves (they end in session_close);
 * pools are freed here once empty. Objects are never freed inside their own callbacks: they
 * go on the reap list, emptied by an event that runs after the current loop turn.
 */
#include "gateway.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <event2/buffer.h>
#include <event2/event.h>

#include "admin.h"
#include "audit.h"
#include "auth.h"
#include "cache.h"
#include "call.h"
#include "config.h"
#include "env.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "reap.h"
#include "router.h"
#include "session.h"
#include "srccount.h"
#include "stream.h"
#include "tls.h"
#include "upstream.h"
#include "util.h"

/* An upstream made from a template on first use. It lives while a pool of it exists (the
 * pools point at `up`); the last pool's free frees it. */
struct dyn_upstream {
    struct vm_upstream_cfg up;          /* name, uri_text and uri owned; tls and sasl point
                                         * into the template (the config snapshot) */
    const struct vm_upstream_cfg *tpl;  /* not owned: in sn->cfg->templates */
    struct snapshot *sn;                /* the snapshot of tpl: kept while this exists */
    int tpl_index;
    int npools;                         /* pool_nodes of it, dying ones included */
    LIST_ENTRY(dyn_upstream) entry;
};

struct pool_node {
    struct vm_pool *pool;
    struct vm_gateway *gw;
    struct dyn_upstream *dyn; /* the pool's upstream when made from a template, else NULL */
    int dying; /* queued for reaping */
    LIST_ENTRY(pool_node) entry;
};

/* A config snapshot and what the gateway keeps per snapshot. Sessions, pools and links point
 * into it (listener, upstream and rule entries); after a reload the old one stays on the
 * `old` list until none of them does (snapshots_collect). */
struct snapshot {
    struct vm_config *cfg;       /* owned */
    SSL_CTX **upstream_tls;      /* owned: per upstream, NULL unless tls:// */
    SSL_CTX **template_tls;      /* owned: per upstream template, shared by its upstreams */
    int *rule_sessions;          /* owned: open sessions per rule; last slot = default */
    LIST_ENTRY(snapshot) entry;
};

/* An upstream an operator paused or drains (POST /upstreams/NAME/...). */
struct up_op {
    char name[128];
    enum vm_upstream_op op;
};

struct vm_gateway {
    struct vm_env env;           /* handed down to pools and sessions */
    struct vm_session_host host; /* what sessions ask of us */
    struct event_base *base;     /* not owned */
    struct snapshot *snap;       /* owned: the current config */
    struct vm_config *cfg;       /* snap->cfg */
    LIST_HEAD(, snapshot) old;   /* owned: earlier snapshots something still points into */
    struct vm_listener **listeners; /* owned, cfg->nlisteners entries */
    LIST_HEAD(, pool_node) pools;   /* owned */
    int npools;
    int nsessions;
    int accepting;
    struct vm_reaper *reaper;    /* owned */
    struct event *trim;          /* owned: gives back unused recycled call records */
    struct vm_audit *audit;      /* owned */
    struct vm_metrics *metrics;  /* owned: counters for GET /metrics */
    struct vm_admin *admin;      /* owned, optional */
    LIST_HEAD(, dyn_upstream) dyns; /* owned: the dynamic upstream registry */
    int ndyns;                   /* in it, idle ones waiting to be freed included */
    int closing;                 /* gateway_free: dyns are freed at the end, not one by one */
    int pools_freed;             /* since the last give_back */
    struct event *dyn_sweep;     /* owned: frees idle dyns (and the snapshots they kept) soon
                                  * after their last pool, outside the reaper */
    struct vm_session **sessions; /* registry (not owned): index = session slot */
    int capsessions;
    struct vm_link_list retiring; /* links saying goodbye (in no pool): freed at shutdown */
    int nunauth;                 /* sessions still authenticating */
    struct vm_srccount *unauth_by_source; /* owned: the same, per source */
    long refused_unauth;         /* closed on accept: max_unauthenticated reached */
    long refused_unauth_source;  /* closed on accept: their source's share reached */
    struct gateway_drain {       /* SIGTERM: see gateway_drain */
        int on;
        int upstream_phase;      /* every session gone: saying goodbye upstream */
        struct event *deadline;  /* owned: limits.drain_timeout_s */
        struct event *tick;      /* owned: watches the goodbyes */
        struct timeval started, goodbye_until;
        int sessions;            /* open when the drain began */
        int calls;               /* outstanding then */
        int cut_off;             /* still outstanding at the deadline */
    } drain;
    struct up_op *up_ops;         /* owned: upstreams an operator paused or drains, by name
                                  * (a reload keeps them); absent = active */
    int nup_ops;
};

static const struct vm_session_host_ops gateway_host_ops;
static enum vm_upstream_op op_of(const struct vm_gateway *gw, const char *name);
static const struct vm_listener_ops gateway_listener_ops;

static void snapshots_collect(struct vm_gateway *gw);

static void dyns_collect(struct vm_gateway *gw);
static void give_back(struct vm_gateway *gw);

/* An upstream made from a template lost its last pool: free it (and an old snapshot it was
 * keeping) once its connections' goodbyes are over (at most 2 s), not at the next trim. */
static void dyn_sweep_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    int had = gw->ndyns;
    dyns_collect(gw);
    snapshots_collect(gw);
    if (gw->ndyns < had && gw->npools == 0 && gw->nsessions == 0)
        give_back(gw); /* the last ones went: what they held too */
    struct dyn_upstream *d;
    LIST_FOREACH(d, &gw->dyns, entry) {
        if (!d->npools && link_list_uses(&gw->retiring, &d->up)) { /* a goodbye to wait for */
            struct timeval again = {0, 500000};
            evtimer_add(gw->dyn_sweep, &again);
            break;
        }
    }
}

/* Give memory back to the system once pools were freed: an idle fleet gateway should shrink
 * to about its resting size, not keep the heap its busiest minute grew (glibc keeps freed
 * memory in its arenas until asked). With no session and no pool left, the recycled call
 * records go too. */
static void give_back(struct vm_gateway *gw)
{
    if (gw->nsessions == 0 && gw->npools == 0)
        call_cache_trim(1);
#ifdef __GLIBC__
    malloc_trim(0);
#endif
    gw->pools_freed = 0;
}

static void trim_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    call_cache_trim(0);
    dyns_collect(gw); /* first: a dyn may be what keeps an old snapshot */
    snapshots_collect(gw);
    if (gw->pools_freed || gw->npools == 0) /* idle: links that said goodbye since, too */
        give_back(gw);
}

static struct snapshot *snapshot_new(struct vm_config *cfg)
{
    struct snapshot *sn = vm_calloc(1, sizeof(*sn));
    sn->cfg = cfg;
    sn->rule_sessions = vm_calloc((size_t)cfg->nrules + 1, sizeof(int));
    sn->upstream_tls = vm_calloc((size_t)cfg->nupstreams, sizeof(SSL_CTX *));
    sn->template_tls = vm_calloc((size_t)cfg->ntemplates + 1, sizeof(SSL_CTX *));
    return sn;
}

static void snapshot_free(struct snapshot *sn)
{
    for (int i = 0; i < sn->cfg->nupstreams; i++)
        if (sn->upstream_tls[i])
            tls_ctx_free(sn->upstream_tls[i]);
    free(sn->upstream_tls);
    for (int i = 0; i < sn->cfg->ntemplates; i++)
        if (sn->template_tls[i])
            tls_ctx_free(sn->template_tls[i]);
    free(sn->template_tls);
    free(sn->rule_sessions);
    config_free(sn->cfg);
    free(sn);
}

/* The client contexts of the tls:// upstreams; -1 (logged) if one fails to load. */
static int snapshot_load_tls(struct snapshot *sn)
{
    for (int i = 0; i < sn->cfg->nupstreams; i++) {
        const struct vm_upstream_cfg *up = &sn->cfg->upstreams[i];
        if (!up->tls)
            continue;
        char err[300];
        sn->upstream_tls[i] = tls_client_ctx(up->tls, err, sizeof(err));
        if (!sn->upstream_tls[i]) {
            vm_err(NULL, "upstream %s: TLS: %s", up->name, err);
            return -1;
        }
    }
    for (int i = 0; i < sn->cfg->ntemplates; i++) {
        const struct vm_upstream_cfg *t = &sn->cfg->templates[i];
        if (!t->tls)
            continue;
        char err[300];
        sn->template_tls[i] = tls_client_ctx(t->tls, err, sizeof(err));
        if (!sn->template_tls[i]) {
            vm_err(NULL, "upstream template %s: TLS: %s", t->name, err);
            return -1;
        }
    }
    return 0;
}

/* The snapshot `p` (a listener, upstream or rule entry) belongs to. */
static struct snapshot *snapshot_of(const struct vm_gateway *gw, const void *p)
{
    if (config_owns(gw->cfg, p))
        return gw->snap;
    struct snapshot *sn;
    LIST_FOREACH(sn, &gw->old, entry)
        if (config_owns(sn->cfg, p))
            return sn;
    return NULL;
}

struct vm_gateway *gateway_new(struct event_base *base, struct vm_config *cfg)
{
    struct vm_gateway *gw = vm_calloc(1, sizeof(*gw));
    gw->base = base;
    gw->snap = snapshot_new(cfg);
    gw->cfg = cfg;
    LIST_INIT(&gw->old);
    gw->accepting = 1;
    LIST_INIT(&gw->pools);
    LIST_INIT(&gw->dyns);
    gw->listeners = calloc((size_t)cfg->nlisteners, sizeof(*gw->listeners));
    gw->reaper = reaper_new(base);
    gw->trim = event_new(base, -1, EV_PERSIST, trim_cb, gw);
    gw->dyn_sweep = evtimer_new(base, dyn_sweep_cb, gw);
    struct timeval every = {10, 0};
    if (!gw->trim || !gw->dyn_sweep || event_add(gw->trim, &every) < 0)
        abort();
    gw->audit = audit_new();
    gw->metrics = metrics_new();
    /* Every configured upstream and listener has its counters from the start (at zero). */
    for (int i = 0; i < cfg->nupstreams; i++)
        (void)metrics_upstream(gw->metrics, cfg->upstreams[i].name);
    for (int i = 0; i < cfg->nlisteners; i++)
        (void)metrics_listener(gw->metrics, cfg->listeners[i].name);
    TAILQ_INIT(&gw->retiring);
    gw->env = (struct vm_env){.base = base, .reaper = gw->reaper, .cfg = cfg, .audit = gw->audit,
                              .metrics = gw->metrics, .retiring = &gw->retiring};
    gw->host = (struct vm_session_host){.ops = &gateway_host_ops, .owner = gw, .env = &gw->env};
    gw->unauth_by_source = srccount_new();
    if (!gw->listeners || !gw->reaper)
        abort();
    return gw;
}

static json_t *admin_status(void *owner)
{
    return gateway_status_json(owner);
}

/* POST /upstreams/NAME/ACTION from the admin endpoint. */
static int upstream_action(void *owner, const char *name, const char *action, const char **state)
{
    struct vm_gateway *gw = owner;
    enum vm_upstream_op op;
    if (gateway_upstream_op(gw, name) < 0)
        return -1;
    if (strcmp(action, "pause") == 0)
        op = VM_UP_PAUSED;
    else if (strcmp(action, "resume") == 0)
        op = VM_UP_ACTIVE;
    else if (strcmp(action, "drain") == 0)
        op = VM_UP_DRAINING;
    else
        return -2;
    if (gateway_upstream_set_op(gw, name, op) < 0)
        return -1;
    *state = pool_op_name(op);
    return 0;
}

/* Serving from gateway_start until the loop stops; during a drain 503 "draining", so that
 * load balancers send new clients elsewhere. */
static int admin_health(void *owner, const char **word)
{
    if (gateway_draining(owner)) {
        *word = "draining";
        return 503;
    }
    *word = "ok";
    return 200;
}

static void admin_metrics(void *owner, struct evbuffer *out)
{
    gateway_metrics(owner, out);
}

static int admin_disconnect(void *owner, unsigned id)
{
    struct vm_gateway *gw = owner;
    for (int i = 0; i < gw->nsessions; i++) {
        if (session_id(gw->sessions[i]) == id) {
            session_close(gw->sessions[i], "disconnected by the admin endpoint");
            return 0;
        }
    }
    return -1;
}

static const struct vm_admin_ops gateway_admin_ops = {
    .status = admin_status,
    .health = admin_health,
    .metrics = admin_metrics,
    .disconnect_session = admin_disconnect,
    .upstream_action = upstream_action,
};

void gateway_adopt(struct vm_gateway *gw, const struct vm_listener_cfg *lcfg, evutil_socket_t fd,
                   const char *peer, const struct vm_identity *id, SSL_CTX *tls)
{
    session_new(&gw->host, lcfg, fd, peer, id, tls);
}

static void accept_client(void *owner, const struct vm_listener_cfg *cfg, evutil_socket_t fd,
                          const char *peer, const struct vm_identity *id, SSL_CTX *tls)
{
    gateway_adopt(owner, cfg, fd, peer, id, tls);
}

int gateway_start(struct vm_gateway *gw)
{
    if (snapshot_load_tls(gw->snap) < 0)
        return -1;
    if (gw->cfg->sasl && auth_global_init(gw->cfg->sasl) < 0)
        return -1;
    /* The admin endpoint first: once clients can connect, the status is there too. */
    if (gw->cfg->admin_address || gw->cfg->admin_unix) {
        gw->admin = admin_new(gw->base, gw->cfg, &gateway_admin_ops, gw);
        if (!gw->admin)
            return -1;
    }
    for (int i = 0; i < gw->cfg->nlisteners; i++) {
        gw->listeners[i] = listener_new(gw->base, &gw->cfg->listeners[i], &gateway_listener_ops,
                                        gw, gw->cfg->auth_timeout_s * 1000);
        if (!gw->listeners[i])
            return -1;
    }
    if (!gw->cfg->policy_present)
        vm_info(NULL, "no policy section: every client may reach every upstream read-write");
    for (int i = 0; i < gw->cfg->nupstreams; i++) {
        char ep[300];
        vm_info(NULL, "upstream %s: %s (%s)", gw->cfg->upstreams[i].name,
                gw->cfg->upstreams[i].uri_text, uri_endpoint(&gw->cfg->upstreams[i].uri, ep,
                                                             sizeof(ep)));
    }
    for (int i = 0; i < gw->cfg->ntemplates; i++)
        vm_info(NULL, "upstream template %s: %s (made on first use, at most %d at once)",
                gw->cfg->templates[i].name, gw->cfg->templates[i].uri_text,
                gw->cfg->max_upstreams);
    return 0;
}

/* Upstreams made from templates that have a pool (idle ones wait in dyns_collect). */
static int live_dyns(const struct vm_gateway *gw)
{
    int n = 0;
    struct dyn_upstream *d;
    LIST_FOREACH(d, &gw->dyns, entry)
        n += d->npools > 0;
    return n;
}

static struct dyn_upstream *find_dyn(const struct vm_gateway *gw, const struct vm_upstream_cfg *up)
{
    struct dyn_upstream *d;
    LIST_FOREACH(d, &gw->dyns, entry)
        if (&d->up == up)
            return d;
    return NULL;
}

static void dyn_free(struct dyn_upstream *d)
{
    free(d->up.name);
    free(d->up.uri_text);
    uri_clear(&d->up.uri);
    free(d);
}

/* Does a session still route to `d` (between its OPEN and close)? Its pools are gone by
 * then in every path we know of; this keeps a surprise from becoming a use after free. */
static int dyn_in_use(struct vm_gateway *gw, const struct dyn_upstream *d)
{
    for (int i = 0; i < gw->nsessions; i++)
        if (session_upstream(gw->sessions[i]) == &d->up)
            return 1;
    return 0;
}

static void set_accepting(struct vm_gateway *gw, int on);

static void close_listeners(struct vm_gateway *gw)
{
    for (int i = 0; i < gw->cfg->nlisteners; i++) {
        if (gw->listeners[i])
            listener_free(gw->listeners[i]);
        gw->listeners[i] = NULL;
    }
}

/* Free the upstreams made from templates that have no pool left. A link saying goodbye
 * (retiring, in no pool) may still read its upstream entry, so one such link keeps its
 * upstream waiting: dyn_sweep comes back (the goodbyes take at most 2 s). Waiting ones are
 * not shown and do not count against max_upstreams. */
static void dyns_collect(struct vm_gateway *gw)
{
    if (gw->closing)
        return;
    struct dyn_upstream *d, *next;
    for (d = LIST_FIRST(&gw->dyns); d; d = next) {
        next = LIST_NEXT(d, entry);
        if (d->npools || dyn_in_use(gw, d) || link_list_uses(&gw->retiring, &d->up))
            continue;
        LIST_REMOVE(d, entry);
        gw->ndyns--;
        /* Its counters go with it, unless the name lives on (a configured upstream, or
         * another made from a changed template after a reload). */
        struct dyn_upstream *o;
        LIST_FOREACH(o, &gw->dyns, entry)
            if (!strcmp(o->up.name, d->up.name))
                break;
        if (!o && !config_upstream(gw->cfg, d->up.name))
            metrics_upstream_forget(gw->metrics, metrics_upstream(gw->metrics, d->up.name));
        dyn_free(d);
    }
}

static void pool_node_free(void *p)
{
    struct pool_node *n = p;
    pool_free(n->pool);
    struct dyn_upstream *d = n->dyn;
    struct vm_gateway *gw = n->gw;
    free(n);
    gw->pools_freed++;
    if (d && --d->npools == 0 && !gw->closing) {
        vm_info(NULL, "upstream %s (template %s): idle, forgotten", d->up.name, d->tpl->name);
        /* Not here: the reaper is running, and snapshots_collect runs it. */
        struct timeval soon = {0, TAILQ_EMPTY(&gw->retiring) ? 0 : 500000};
        evtimer_add(gw->dyn_sweep, &soon);
    }
    if (!gw->closing && gw->npools == 0 && gw->nsessions == 0)
        give_back(gw); /* the last one: now rather than at the next trim */
}

/*
 * Shutdown, in this order:
 *   1. listeners and the admin endpoint: nobody new comes in;
 *   2. every open session is closed as if its client had left: queued calls are freed, calls
 *      in flight are swallowed, subscriptions, streams and link references are given back,
 *      while every pool is still there;
 *   3. the pools: their links fail the swallowed calls (freeing them) and drop the event
 *      registrations;
 *   4. links still retiring (they belong to no pool);
 *   5. the reap list, which by now holds every session, link and emptied pool.
 */
void gateway_free(struct vm_gateway *gw)
{
    if (!gw)
        return;
    gw->closing = 1;
    close_listeners(gw);
    free(gw->listeners);
    admin_free(gw->admin);
    while (gw->nsessions > 0) /* each close leaves the registry */
        session_close(gw->sessions[gw->nsessions - 1], "virtmux is shutting down");
    while (!LIST_EMPTY(&gw->pools)) {
        struct pool_node *n = LIST_FIRST(&gw->pools);
        LIST_REMOVE(n, entry);
        if (!n->dying)
            pool_node_free(n);
    }
    link_free_retiring(&gw->retiring); /* links saying goodbye belong to no pool */
    if (gw->drain.deadline)
        event_free(gw->drain.deadline);
    if (gw->drain.tick)
        event_free(gw->drain.tick);
    reaper_free(gw->reaper);
    event_free(gw->trim);
    event_free(gw->dyn_sweep);
    call_cache_trim(1);
    audit_free(gw->audit);
    metrics_free(gw->metrics);
    if (gw->cfg->sasl)
        auth_global_done();
    free(gw->up_ops);
    srccount_free(gw->unauth_by_source);
    free(gw->sessions);
    while (!LIST_EMPTY(&gw->dyns)) { /* after the reaper: its pool frees still read them */
        struct dyn_upstream *d = LIST_FIRST(&gw->dyns);
        LIST_REMOVE(d, entry);
        dyn_free(d);
    }
    while (!LIST_EMPTY(&gw->old)) {
        struct snapshot *sn = LIST_FIRST(&gw->old);
        LIST_REMOVE(sn, entry);
        snapshot_free(sn);
    }
    snapshot_free(gw->snap);
    free(gw);
}

void gateway_log_status(struct vm_gateway *gw)
{
    vm_info(NULL, "status: %d sessions, %d pools", gw->nsessions, gw->npools);
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry)
        pool_log_status(n->pool);
}

/* Counters that must return to their resting values once clients leave (fault tests read
 * them): every session, call, queued call, link reference and stream is accounted here. */
static json_t *totals_json(struct vm_gateway *gw)
{
    struct vm_pool_totals t = {0};
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry)
        pool_add_totals(n->pool, &t);
    int outstanding = 0;
    for (int i = 0; i < gw->nsessions; i++)
        outstanding += session_outstanding(gw->sessions[i]);
    return json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i}", "sessions",
                     gw->nsessions, "unauthenticated", gw->nunauth, "calls_outstanding",
                     outstanding, "pools", gw->npools, "links", t.links, "link_refs",
                     t.link_refs, "inflight", t.inflight, "internal_inflight", t.internal,
                     "queued", t.queued, "opening", t.opening, "streams", stream_count());
}

/* Everything the pools of configured upstream `up` hold, summed; `last_error` is the first
 * pool's failure (NULL when none). Returns the number of pools. */
static int upstream_totals(struct vm_gateway *gw, const struct vm_upstream_cfg *up,
                           struct vm_pool_totals *t, const char **last_error)
{
    int npools = 0;
    *t = (struct vm_pool_totals){0};
    *last_error = NULL;
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry) {
        if (pool_upstream(n->pool) != up)
            continue;
        npools++;
        pool_add_totals(n->pool, t);
        if (!*last_error)
            *last_error = pool_last_error(n->pool);
    }
    return npools;
}

/* One word for an upstream: ready (a connection is READY), connecting, backoff (every
 * connection is waiting to reconnect), or idle (none: unused, or its pools were freed). */
static const char *upstream_state(const struct vm_pool_totals *t)
{
    if (t->by_state[VM_LINK_READY])
        return "ready";
    if (t->by_state[VM_LINK_CONNECTING] || t->by_state[VM_LINK_HANDSHAKE])
        return "connecting";
    if (t->by_state[VM_LINK_BACKOFF])
        return "backoff";
    return "idle";
}

/* Every upstream that exists now: the configured ones, then those made from templates (with
 * their template's "match" in tpl[], NULL for configured ones). Caller frees both arrays. */
static int all_upstreams(struct vm_gateway *gw, const struct vm_upstream_cfg ***ups,
                         const char ***tpl)
{
    int n = 0;
    *ups = vm_calloc((size_t)(gw->cfg->nupstreams + gw->ndyns) + 1, sizeof(**ups));
    *tpl = vm_calloc((size_t)(gw->cfg->nupstreams + gw->ndyns) + 1, sizeof(**tpl));
    for (int i = 0; i < gw->cfg->nupstreams; i++)
        (*ups)[n++] = &gw->cfg->upstreams[i];
    struct dyn_upstream *d;
    LIST_FOREACH(d, &gw->dyns, entry) {
        if (!d->npools)
            continue; /* idle: waiting to be freed */
        (*tpl)[n] = d->tpl->name;
        (*ups)[n++] = &d->up;
    }
    return n;
}

static json_t *upstreams_json(struct vm_gateway *gw)
{
    json_t *arr = json_array();
    const struct vm_upstream_cfg **ups;
    const char **tpls;
    int nups = all_upstreams(gw, &ups, &tpls);
    for (int i = 0; i < nups; i++) {
        const struct vm_upstream_cfg *up = ups[i];
        struct vm_pool_totals t;
        const char *err;
        int npools = upstream_totals(gw, up, &t, &err);
        if (!err && !t.by_state[VM_LINK_READY]) /* its pools may be gone; the failure stays */
            err = metrics_upstream_last_error(gw->metrics, metrics_upstream(gw->metrics,
                                                                            up->name));
        /* A configured upstream by name (sessions of an older snapshot point at its entry
         * there); one made from a template by entry (after a reload two may share a name). */
        int sessions = 0;
        for (int k = 0; k < gw->nsessions; k++) {
            const struct vm_upstream_cfg *su = session_upstream(gw->sessions[k]);
            sessions += tpls[i] ? su == up : su && !find_dyn(gw, su) && !strcmp(su->name,
                                                                              up->name);
        }
        json_t *o = json_pack("{s:s, s:s, s:s, s:i, s:{s:i, s:i, s:i, s:i}, s:i, s:i, s:i, s:i, "
                              "s:i, s:i, s:i, s:i, s:i, s:i, s:o}",
                              "name", up->name, "uri", up->uri_text, "state", upstream_state(&t),
                              "connections", t.links, "connections_by_state", "connecting",
                              t.by_state[VM_LINK_CONNECTING], "handshake",
                              t.by_state[VM_LINK_HANDSHAKE], "ready", t.by_state[VM_LINK_READY],
                              "backoff", t.by_state[VM_LINK_BACKOFF], "refcounts", t.link_refs,
                              "sessions", sessions, "pools", npools, "inflight", t.inflight,
                              "internal_inflight", t.internal, "queued", t.queued, "opening",
                              t.opening, "streams", t.streams, "event_registrations",
                              t.event_registrations, "event_subscribers", t.event_subscribers,
                              "last_error", err ? json_string(err) : json_null());
        /* what an operator made of it (POST /upstreams/NAME/...), pools or not */
        json_object_set_new(o, "operator", json_string(pool_op_name(op_of(gw, up->name))));
        json_object_set_new(o, "template", tpls[i] ? json_string(tpls[i]) : json_null());
        json_array_append_new(arr, o);
    }
    free(ups);
    free(tpls);
    return arr;
}

static json_t *templates_json(struct vm_gateway *gw)
{
    json_t *arr = json_array();
    for (int i = 0; i < gw->cfg->ntemplates; i++) {
        int made = 0;
        struct dyn_upstream *d;
        LIST_FOREACH(d, &gw->dyns, entry)
            made += d->tpl == &gw->cfg->templates[i] && d->npools > 0;
        json_array_append_new(arr, json_pack("{s:s, s:s, s:i}", "match",
                                             gw->cfg->templates[i].name, "uri",
                                             gw->cfg->templates[i].uri_text, "upstreams", made));
    }
    return arr;
}

static void iso8601(long long when, char *buf, size_t len)
{
    time_t tt = (time_t)when;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static json_t *sessions_json(struct vm_gateway *gw)
{
    json_t *arr = json_array();
    for (int i = 0; i < gw->nsessions; i++) {
        struct vm_session_view v;
        session_view(gw->sessions[i], &v);
        char since[32];
        iso8601(v.since, since, sizeof(since));
        json_array_append_new(
            arr, json_pack("{s:I, s:s, s:s, s:s, s:o, s:s, s:b, s:s, s:{s:I, s:i}}", "id",
                           (json_int_t)v.id, "identity", v.identity, "listener", v.listener,
                           "peer", v.peer, "upstream",
                           v.upstream ? json_string(v.upstream) : json_null(), "state", v.state,
                           "readonly", v.readonly, "since", since, "calls", "total",
                           (json_int_t)v.calls, "in_flight", v.outstanding));
    }
    return arr;
}

json_t *gateway_status_json(struct vm_gateway *gw)
{
    json_t *pools = json_array();
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry)
        json_array_append_new(pools, pool_status_json(n->pool));
    json_t *unauth = json_pack("{s:i, s:i, s:I, s:I}", "clients", gw->nunauth, "sources",
                               srccount_sources(gw->unauth_by_source), "refused",
                               (json_int_t)gw->refused_unauth, "refused_per_source",
                               (json_int_t)gw->refused_unauth_source);
    json_t *st = json_pack("{s:i, s:i, s:o, s:o, s:I, s:o, s:o, s:o, s:o}", "sessions",
                     gw->nsessions, "max_clients", gw->cfg->max_clients, "totals",
                     totals_json(gw), "pools", pools, "denials_total",
                     (json_int_t)audit_total(gw->audit), "denials", audit_json(gw->audit),
                     "unauthenticated", unauth, "session_list", sessions_json(gw), "upstreams",
                     upstreams_json(gw));
    json_object_set_new(st, "templates", templates_json(gw));
    json_object_set_new(st, "dynamic_upstreams", json_pack("{s:i, s:i}", "count", live_dyns(gw),
                                                           "max", gw->cfg->max_upstreams));
    return st;
}

/* ---- GET /metrics: the gauges of live objects, then metrics.c's counters ---- */

struct ident_count {
    const char *listener, *identity;
};

static int ident_cmp(const void *a, const void *b)
{
    const struct ident_count *x = a, *y = b;
    int c = strcmp(x->listener, y->listener);
    return c ? c : strcmp(x->identity, y->identity);
}

static void sessions_metrics(struct vm_gateway *gw, struct evbuffer *out)
{
    metrics_write_family(out, "virtmux_sessions", "gauge",
                         "Open client connections by listener and identity.");
    struct ident_count *v = vm_calloc((size_t)gw->nsessions + 1, sizeof(*v));
    for (int i = 0; i < gw->nsessions; i++) {
        struct vm_session_view sv;
        session_view(gw->sessions[i], &sv);
        v[i] = (struct ident_count){sv.listener, sv.identity};
    }
    qsort(v, (size_t)gw->nsessions, sizeof(*v), ident_cmp);
    for (int i = 0; i < gw->nsessions;) {
        int j = i;
        while (j < gw->nsessions && !ident_cmp(&v[i], &v[j]))
            j++;
        const char *labels[] = {"listener", v[i].listener, "identity", v[i].identity, NULL};
        metrics_write_sample(out, "virtmux_sessions", labels, j - i);
        i = j;
    }
    free(v);
    metrics_write_family(out, "virtmux_sessions_unauthenticated", "gauge",
                         "Client connections still authenticating.");
    metrics_write_sample(out, "virtmux_sessions_unauthenticated", NULL, gw->nunauth);
    metrics_write_family(out, "virtmux_max_clients", "gauge", "limits.max_clients.");
    metrics_write_sample(out, "virtmux_max_clients", NULL, gw->cfg->max_clients);
}

/* Per configured upstream, one gauge family at a time (the format wants families whole). */
static void upstream_metrics(struct vm_gateway *gw, struct evbuffer *out)
{
    const struct vm_upstream_cfg **ups;
    const char **tpls;
    int n = all_upstreams(gw, &ups, &tpls);
    struct vm_pool_totals *t = vm_calloc((size_t)n + 1, sizeof(*t));
    for (int i = 0; i < n; i++) {
        const char *err;
        (void)upstream_totals(gw, ups[i], &t[i], &err);
    }
    static const char *const states[] = {"connecting", "handshake", "ready", "backoff"};
    metrics_write_family(out, "virtmux_upstream_connections", "gauge",
                         "Pooled upstream connections by upstream and state.");
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) {
            const char *labels[] = {"upstream", ups[i]->name, "state", states[k], NULL};
            metrics_write_sample(out, "virtmux_upstream_connections", labels,
                                 t[i].by_state[k]);
        }
    static const struct {
        const char *name, *help;
        size_t off;
    } gauges[] = {
        {"virtmux_upstream_session_refs", "Sessions holding a pooled connection as their home.",
         offsetof(struct vm_pool_totals, link_refs)},
        {"virtmux_calls_in_flight", "Client calls sent upstream and not answered yet.",
         offsetof(struct vm_pool_totals, inflight)},
        {"virtmux_calls_queued", "Client calls waiting for a free upstream connection.",
         offsetof(struct vm_pool_totals, queued)},
        {"virtmux_gateway_calls_in_flight",
         "The gateway's own calls (event registrations) in flight.",
         offsetof(struct vm_pool_totals, internal)},
        {"virtmux_streams", "Streams open, each on its own upstream connection.",
         offsetof(struct vm_pool_totals, streams)},
        {"virtmux_streams_waiting", "Streams waiting for a pool.max_streams slot.",
         offsetof(struct vm_pool_totals, stream_waiting)},
        {"virtmux_event_registrations", "Event registrations held upstream.",
         offsetof(struct vm_pool_totals, event_registrations)},
        {"virtmux_event_subscribers", "Client event registrations (subscribers).",
         offsetof(struct vm_pool_totals, event_subscribers)},
    };
    for (size_t g = 0; g < sizeof(gauges) / sizeof(gauges[0]); g++) {
        metrics_write_family(out, gauges[g].name, "gauge", gauges[g].help);
        for (int i = 0; i < n; i++) {
            const char *labels[] = {"upstream", ups[i]->name, NULL};
            int v = *(const int *)((const char *)&t[i] + gauges[g].off);
            metrics_write_sample(out, gauges[g].name, labels, v);
        }
    }
    metrics_write_family(out, "virtmux_dynamic_upstreams", "gauge",
                         "Upstreams made from upstream_templates that exist now.");
    metrics_write_sample(out, "virtmux_dynamic_upstreams", NULL, live_dyns(gw));
    metrics_write_family(out, "virtmux_max_upstreams", "gauge", "limits.max_upstreams.");
    metrics_write_sample(out, "virtmux_max_upstreams", NULL, gw->cfg->max_upstreams);
    free(t);
    free(ups);
    free(tpls);
}

static void denial_metrics(struct vm_gateway *gw, struct evbuffer *out)
{
    metrics_write_family(out, "virtmux_policy_denials_total", "counter",
                         "Calls and connections refused by policy or read-only, by identity, "
                         "procedure and upstream.");
    json_t *d = audit_json(gw->audit);
    size_t i;
    json_t *e;
    json_array_foreach(d, i, e) {
        const char *labels[] = {
            "identity", json_string_value(json_object_get(e, "identity")),
            "procedure", json_string_value(json_object_get(e, "procedure")),
            "upstream", json_string_value(json_object_get(e, "upstream")), NULL};
        metrics_write_sample(out, "virtmux_policy_denials_total", labels,
                             (double)json_integer_value(json_object_get(e, "count")));
    }
    json_decref(d);
}

void gateway_metrics(struct vm_gateway *gw, struct evbuffer *out)
{
    sessions_metrics(gw, out);
    upstream_metrics(gw, out);
    denial_metrics(gw, out);
    metrics_render(gw->metrics, out);
}

struct vm_audit *gateway_audit(const struct vm_gateway *gw)
{
    return gw->audit;
}

/* Rules are counted in their own snapshot: a session keeps the rule it opened under. */
static int *rule_slot(struct vm_gateway *gw, const struct vm_rule *rule)
{
    struct snapshot *sn = snapshot_of(gw, rule);
    if (!sn) { /* policy.c's static allow-all rule (no policy section): never capped */
        static int uncapped;
        return &uncapped;
    }
    return &sn->rule_sessions[rule->index >= 0 ? rule->index : sn->cfg->nrules];
}

static int host_rule_acquire(void *owner, const struct vm_rule *rule)
{
    struct vm_gateway *gw = owner;
    int *slot = rule_slot(gw, rule);
    if (rule->max_sessions && *slot >= rule->max_sessions)
        return -1;
    (*slot)++;
    return 0;
}

static void host_rule_release(void *owner, const struct vm_rule *rule)
{
    struct vm_gateway *gw = owner;
    (*rule_slot(gw, rule))--;
}

SSL_CTX *gateway_upstream_tls(const struct vm_gateway *gw, const struct vm_upstream_cfg *up)
{
    struct snapshot *sn = snapshot_of(gw, up);
    if (sn)
        return sn->upstream_tls[up - sn->cfg->upstreams];
    struct dyn_upstream *d = find_dyn(gw, up);
    return d ? d->sn->template_tls[d->tpl_index] : NULL;
}

struct event_base *gateway_base(const struct vm_gateway *gw)
{
    return gw->base;
}

const struct vm_config *gateway_config(const struct vm_gateway *gw)
{
    return gw->cfg;
}

unsigned gateway_next_id(struct vm_gateway *gw)
{
    return env_next_id(&gw->env);
}

struct vm_env *gateway_env(struct vm_gateway *gw)
{
    return &gw->env;
}

static void host_pool_check(void *owner, struct vm_pool *p);

/* The operator state of upstream `name` (by name: a reload keeps it). */
static enum vm_upstream_op op_of(const struct vm_gateway *gw, const char *name)
{
    for (int i = 0; i < gw->nup_ops; i++)
        if (strcmp(gw->up_ops[i].name, name) == 0)
            return gw->up_ops[i].op;
    return VM_UP_ACTIVE;
}

/* A configured upstream, or a name a template would make an upstream of (whether it exists
 * now or not: the operator state is kept by name, so a pause outlives the upstream's idle
 * freeing and applies when it is made again). */
static int configured(const struct vm_gateway *gw, const char *name)
{
    for (int i = 0; i < gw->cfg->nupstreams; i++)
        if (strcmp(gw->cfg->upstreams[i].name, name) == 0)
            return 1;
    char err[300];
    return config_template(gw->cfg, name) && router_check_name(name, err, sizeof(err)) == 0;
}

int gateway_upstream_op(const struct vm_gateway *gw, const char *name)
{
    return configured(gw, name) ? (int)op_of(gw, name) : -1;
}

int gateway_upstream_set_op(struct vm_gateway *gw, const char *name, enum vm_upstream_op op)
{
    if (!configured(gw, name) || strlen(name) >= sizeof(gw->up_ops[0].name))
        return -1;
    enum vm_upstream_op was = op_of(gw, name);
    if (was != op)
        vm_warn(NULL, "upstream %s: %s -> %s by an operator", name, pool_op_name(was),
                pool_op_name(op));
    int i;
    for (i = 0; i < gw->nup_ops; i++)
        if (strcmp(gw->up_ops[i].name, name) == 0)
            break;
    if (op == VM_UP_ACTIVE) {
        if (i < gw->nup_ops)
            gw->up_ops[i] = gw->up_ops[--gw->nup_ops];
    } else {
        if (i == gw->nup_ops) {
            gw->up_ops = realloc(gw->up_ops, (size_t)(gw->nup_ops + 1) * sizeof(*gw->up_ops));
            if (!gw->up_ops)
                abort();
            snprintf(gw->up_ops[gw->nup_ops++].name, sizeof(gw->up_ops[0].name), "%s", name);
        }
        gw->up_ops[i].op = op;
    }
    /* Every pool of that upstream, from earlier snapshots too. A pool told here may empty
     * itself (a drain answered its last waiter): walk a copy. */
    int n = 0;
    struct pool_node *pn;
    LIST_FOREACH(pn, &gw->pools, entry)
        n++;
    struct vm_pool **todo = vm_calloc((size_t)n + 1, sizeof(*todo));
    n = 0;
    LIST_FOREACH(pn, &gw->pools, entry)
        if (!pn->dying && strcmp(pool_upstream(pn->pool)->name, name) == 0)
            todo[n++] = pn->pool;
    for (int k = 0; k < n; k++)
        pool_set_op(todo[k], op);
    free(todo);
    return 0;
}

static void pool_maybe_empty(void *owner, struct vm_pool *p)
{
    host_pool_check(owner, p);
}

static void pool_link_lost(void *owner, struct vm_link *l, const char *why)
{
    gateway_link_lost(owner, l, why);
}

static const struct vm_pool_ops gateway_pool_ops = {
    .maybe_empty = pool_maybe_empty,
    .link_lost = pool_link_lost,
};

static struct vm_pool *host_pool(void *owner, const struct vm_upstream_cfg *up, const char *name,
                                 int readonly)
{
    struct vm_gateway *gw = owner;
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry)
        if (!n->dying && pool_matches(n->pool, up, name, readonly))
            return n->pool;
    /* A pool of an earlier snapshot serves an upstream a reload left as it was, so its
     * connections are shared as before. tls:// ones are not reused: new sessions get
     * connections with the certificates read at the reload. */
    LIST_FOREACH(n, &gw->pools, entry) {
        const struct vm_upstream_cfg *was = pool_upstream(n->pool);
        if (!n->dying && !up->tls && !n->dyn && !find_dyn(gw, up) &&
            config_upstream_same(was, up) &&
            pool_matches(n->pool, was, name, readonly))
            return n->pool;
    }
    n = vm_calloc(1, sizeof(*n));
    n->gw = gw;
    n->dyn = find_dyn(gw, up);
    if (n->dyn)
        n->dyn->npools++;
    n->pool = pool_new(&gw->env, &gateway_pool_ops, gw, up, name, readonly,
                       gateway_upstream_tls(gw, up));
    pool_set_op(n->pool, op_of(gw, up->name));
    LIST_INSERT_HEAD(&gw->pools, n, entry);
    gw->npools++;
    return n->pool;
}

/* Find or make upstream `upname` from template `tpl`, then its pool. The router checked the
 * name; nothing connects until the pool's first link does. */
static struct vm_pool *host_template_pool(void *owner, const struct vm_upstream_cfg *tpl,
                                          const char *upname, const char *name, int readonly,
                                          char *err, size_t errlen)
{
    struct vm_gateway *gw = owner;
    struct dyn_upstream *d;
    /* After a reload, one made from an unchanged template is still the same upstream. */
    LIST_FOREACH(d, &gw->dyns, entry)
        if (!strcmp(d->up.name, upname) && (d->tpl == tpl || config_upstream_same(d->tpl, tpl)))
            break;
    if (d && d->npools)
        return host_pool(gw, &d->up, name, readonly);
    /* A new one, or one idle and waiting to be freed: either counts again. */
    if (live_dyns(gw) >= gw->cfg->max_upstreams) {
        metrics_limit(gw->metrics, VM_LIMIT_MAX_UPSTREAMS);
        vm_warn(NULL, "limits.max_upstreams (%d) reached: upstream %s not made",
                gw->cfg->max_upstreams, upname);
        snprintf(err, errlen, "virtmux already has limits.max_upstreams (%d) upstreams made "
                 "from templates; upstream %s can be made once one of them goes idle",
                 gw->cfg->max_upstreams, upname);
        return NULL;
    }
    if (d)
        return host_pool(gw, &d->up, name, readonly);
    d = vm_calloc(1, sizeof(*d));
    d->up = *tpl; /* pool, tls, sasl: the template's (the snapshot outlives us) */
    d->up.name = vm_strdup(upname);
    d->up.uri_text = uri_expand(tpl->uri_text, upname);
    memset(&d->up.uri, 0, sizeof(d->up.uri));
    char why[256];
    if (uri_parse(d->up.uri_text, &d->up.uri, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "upstream %s: template %s gives the URI %s: %s", upname, tpl->name,
                 d->up.uri_text, why);
        dyn_free(d);
        return NULL;
    }
    d->tpl = tpl;
    d->sn = gw->snap;
    d->tpl_index = (int)(tpl - gw->cfg->templates);
    LIST_INSERT_HEAD(&gw->dyns, d, entry);
    gw->ndyns++;
    (void)metrics_upstream(gw->metrics, upname);
    vm_info(NULL, "upstream %s: made from template %s: %s", upname, tpl->name, d->up.uri_text);
    return host_pool(gw, &d->up, name, readonly);
}

struct vm_pool *gateway_pool(struct vm_gateway *gw, const struct vm_upstream_cfg *up,
                             const char *name, int readonly)
{
    return host_pool(gw, up, name, readonly);
}

static void host_pool_check(void *owner, struct vm_pool *p)
{
    struct vm_gateway *gw = owner;
    if (!pool_is_empty(p))
        return;
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry) {
        if (n->pool == p && !n->dying) {
            n->dying = 1;
            LIST_REMOVE(n, entry);
            gw->npools--;
            gateway_defer_free(gw, pool_node_free, n);
            return;
        }
    }
}

/* A write went to upstream `up`: every pool of it (read-only and read-write, any name, and
 * of any config snapshot: matched by name) drops its cached replies, since they all see the
 * same hypervisor. */
static void host_upstream_write(void *owner, const struct vm_upstream_cfg *up)
{
    struct vm_gateway *gw = owner;
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry)
        if (strcmp(pool_upstream(n->pool)->name, up->name) == 0)
            cache_invalidate(pool_cache(n->pool), VM_CACHE_INVALIDATED_WRITE);
}

static void set_accepting(struct vm_gateway *gw, int on)
{
    if (gw->accepting == on || gw->drain.on) /* draining: the listeners are gone */
        return;
    gw->accepting = on;
    for (int i = 0; i < gw->cfg->nlisteners; i++)
        if (gw->listeners[i])
            listener_set_enabled(gw->listeners[i], on);
    if (!on)
        metrics_limit(gw->metrics, VM_LIMIT_MAX_CLIENTS);
    if (!on)
        vm_warn(NULL, "max_clients (%d) reached: not accepting new clients", gw->cfg->max_clients);
    else
        vm_info(NULL, "below max_clients again: accepting");
}

static void host_opened(void *owner, struct vm_session *s)
{
    struct vm_gateway *gw = owner;
    if (gw->nsessions == gw->capsessions) {
        gw->capsessions = gw->capsessions ? gw->capsessions * 2 : 64;
        gw->sessions = realloc(gw->sessions, (size_t)gw->capsessions * sizeof(*gw->sessions));
        if (!gw->sessions)
            abort();
    }
    gw->sessions[gw->nsessions] = s;
    session_set_slot(s, gw->nsessions);
    if (++gw->nsessions >= gw->cfg->max_clients)
        set_accepting(gw, 0);
}

static void host_closed(void *owner, struct vm_session *s)
{
    struct vm_gateway *gw = owner;
    int slot = session_slot(s);
    struct vm_session *last = gw->sessions[gw->nsessions - 1];
    gw->sessions[slot] = last;
    session_set_slot(last, slot);
    if (--gw->nsessions < gw->cfg->max_clients)
        set_accepting(gw, 1);
}

static enum vm_unauth host_unauth_acquire(void *owner, const char *source)
{
    struct vm_gateway *gw = owner;
    if (gw->nunauth >= gw->cfg->max_unauthenticated) {
        gw->refused_unauth++;
        metrics_limit(gw->metrics, VM_LIMIT_MAX_UNAUTHENTICATED);
        return VM_UNAUTH_FULL;
    }
    /* One source alone cannot fill the gateway-wide cap and lock every other client out. */
    if (srccount_acquire(gw->unauth_by_source, source,
                         gw->cfg->max_unauthenticated_per_source) < 0) {
        gw->refused_unauth_source++;
        metrics_limit(gw->metrics, VM_LIMIT_MAX_UNAUTHENTICATED_PER_SOURCE);
        return VM_UNAUTH_SOURCE_FULL;
    }
    gw->nunauth++;
    return VM_UNAUTH_OK;
}

static void host_unauth_release(void *owner, const char *source)
{
    struct vm_gateway *gw = owner;
    srccount_release(gw->unauth_by_source, source);
    gw->nunauth--;
}

/* A socket still sending its PROXY header counts against max_unauthenticated only: its
 * source is the balancer's, shared by every client behind it, so a per-source share would
 * refuse a burst of real clients. Once the header names the client, the session counts it
 * against that source as usual. */
static enum vm_unauth listener_hold(void *owner)
{
    struct vm_gateway *gw = owner;
    if (gw->nunauth >= gw->cfg->max_unauthenticated) {
        gw->refused_unauth++;
        metrics_limit(gw->metrics, VM_LIMIT_MAX_UNAUTHENTICATED);
        return VM_UNAUTH_FULL;
    }
    gw->nunauth++;
    return VM_UNAUTH_OK;
}

static void listener_release(void *owner)
{
    struct vm_gateway *gw = owner;
    gw->nunauth--;
}

/* A client that broke the PROXY protocol is an error of kind "protocol", like one that breaks
 * libvirt's framing. */
static void listener_header_refused(void *owner)
{
    struct vm_gateway *gw = owner;
    metrics_error(gw->metrics, VM_ERRK_PROTOCOL);
}

static const struct vm_listener_ops gateway_listener_ops = {
    .accept = accept_client,
    .hold = listener_hold,
    .release = listener_release,
    .header_refused = listener_header_refused,
};

static const struct vm_session_host_ops gateway_host_ops = {
    .pool = host_pool,
    .template_pool = host_template_pool,
    .pool_check = host_pool_check,
    .rule_acquire = host_rule_acquire,
    .rule_release = host_rule_release,
    .opened = host_opened,
    .closed = host_closed,
    .unauth_acquire = host_unauth_acquire,
    .unauth_release = host_unauth_release,
    .upstream_write = host_upstream_write,
};

void gateway_link_lost(struct vm_gateway *gw, struct vm_link *l, const char *why)
{
    /* Walk backwards: a session told here may leave the registry at once. One that can move
     * to another READY link of its pool does so and never notices. */
    for (int i = gw->nsessions - 1; i >= 0; i--)
        if (i < gw->nsessions && session_home(gw->sessions[i]) == l &&
            session_rehome(gw->sessions[i]) < 0)
            session_upstream_lost(gw->sessions[i], why);
}

void gateway_defer_free(struct vm_gateway *gw, void (*fn)(void *), void *p)
{
    reaper_defer(gw->reaper, fn, p);
}

struct vm_reaper *gateway_reaper(const struct vm_gateway *gw)
{
    return gw->reaper;
}

/* ---- drain (SIGTERM / SIGINT) ----
 *
 *   1. listeners close (unix socket files go): nobody new comes in; the admin endpoint stays;
 *   2. every session is told to drain: idle ones close now, busy ones once their calls,
 *      streams and registrations have finished; new upstream calls are refused meanwhile;
 *   3. at limits.drain_timeout_s the sessions left are closed, their calls cut off;
 *   4. with no session left, their event registrations are being dropped upstream; every
 *      link with nothing in flight sends CONNECT_CLOSE (libvirtd must not see a connection
 *      vanish with deregistrations pending) and goes once answered, for GOODBYE_S at most;
 *   5. one summary line, and the loop stops (main exits 0).
 */
#define GOODBYE_S 5

int gateway_draining(const struct vm_gateway *gw)
{
    return gw->drain.on;
}

static double since(struct vm_gateway *gw, const struct timeval *t0)
{
    struct timeval now, d;
    event_base_gettimeofday_cached(gw->base, &now);
    evutil_timersub(&now, t0, &d);
    return (double)d.tv_sec + d.tv_usec / 1e6;
}

static void drain_finish(struct vm_gateway *gw, int complete)
{
    struct gateway_drain *d = &gw->drain;
    event_del(d->tick);
    event_del(d->deadline);
    if (!complete)
        vm_warn(NULL, "drain: upstream connections still busy after %d s of goodbyes: "
                "closing them", GOODBYE_S);
    vm_info(NULL, "drained in %.1f s: %d sessions closed, %d calls completed, %d calls cut "
            "off at the %d s timeout", since(gw, &d->started), d->sessions,
            d->calls - d->cut_off, d->cut_off, gw->cfg->drain_timeout_s);
    event_base_loopexit(gw->base, NULL);
}

static void drain_tick(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    struct gateway_drain *d = &gw->drain;
    for (int i = gw->nsessions - 1; i >= 0; i--) /* backwards: a session may leave */
        if (i < gw->nsessions)
            session_drain(gw->sessions[i]);
    if (gw->nsessions > 0)
        return;
    struct timeval now;
    event_base_gettimeofday_cached(gw->base, &now);
    if (!d->upstream_phase) {
        d->upstream_phase = 1;
        struct timeval add = {GOODBYE_S, 0};
        evutil_timeradd(&now, &add, &d->goodbye_until);
        vm_info(NULL, "drain: every session closed; closing upstream connections");
    }
    /* A retired link may empty its pool, which then leaves the list: step ahead first. */
    struct pool_node *n, *next;
    for (n = LIST_FIRST(&gw->pools); n; n = next) {
        next = LIST_NEXT(n, entry);
        (void)pool_retire_idle(n->pool);
    }
    if (LIST_EMPTY(&gw->pools) && TAILQ_EMPTY(&gw->retiring))
        drain_finish(gw, 1);
    else if (evutil_timercmp(&now, &d->goodbye_until, >))
        drain_finish(gw, 0);
}

static void drain_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    struct gateway_drain *d = &gw->drain;
    for (int i = 0; i < gw->nsessions; i++)
        d->cut_off += session_outstanding(gw->sessions[i]);
    if (gw->nsessions)
        vm_warn(NULL, "drain timeout (%d s): closing %d sessions, cutting off %d calls",
                gw->cfg->drain_timeout_s, gw->nsessions, d->cut_off);
    while (gw->nsessions > 0)
        session_close(gw->sessions[gw->nsessions - 1], "drain timeout: virtmux is stopping");
    drain_tick(-1, 0, gw);
}

void gateway_drain(struct vm_gateway *gw)
{
    struct gateway_drain *d = &gw->drain;
    if (d->on)
        return;
    d->on = 1;
    event_base_gettimeofday_cached(gw->base, &d->started);
    close_listeners(gw);
    d->sessions = gw->nsessions;
    for (int i = 0; i < gw->nsessions; i++)
        d->calls += session_outstanding(gw->sessions[i]);
    vm_info(NULL, "draining: listeners closed; %d sessions, %d calls outstanding; waiting up "
            "to %d s", d->sessions, d->calls, gw->cfg->drain_timeout_s);
    d->deadline = evtimer_new(gw->base, drain_deadline, gw);
    d->tick = event_new(gw->base, -1, EV_PERSIST, drain_tick, gw);
    struct timeval limit = {gw->cfg->drain_timeout_s, 0}, every = {0, 50000};
    if (!d->deadline || !d->tick || evtimer_add(d->deadline, &limit) < 0 ||
        event_add(d->tick, &every) < 0)
        abort();
    /* Backwards: an idle session leaves the registry at once. */
    for (int i = gw->nsessions - 1; i >= 0; i--)
        if (i < gw->nsessions)
            session_drain(gw->sessions[i]);
}

/* ---- reload (SIGHUP) ----
 *
 *   1. read and validate the whole file into a new snapshot (and its tls:// upstream
 *      contexts); any error: log it, keep running on the old one;
 *   2. keys that cannot change while running (process.*, admin.*, sasl once set up) keep
 *      their running values, moved into the new snapshot (warned when they differ);
 *   3. listeners, matched by name: same socket -> kept, described by the new entry, TLS files
 *      re-read; otherwise a new socket. New sockets that collide with an old listener that
 *      goes are bound once it is closed; any other bind failure undoes step 3 and refuses;
 *   4. swap: the new snapshot is current (env->cfg: new OPENs, policy, limits, keepalive);
 *      the old one waits until no session, pool or link points into it. Existing sessions
 *      keep their listener entry, rule and pool; pools of removed or changed upstreams
 *      drain as their sessions leave.
 */

static int snapshot_in_use(struct vm_gateway *gw, const struct snapshot *sn)
{
    for (int i = 0; i < gw->nsessions; i++) {
        struct vm_session *s = gw->sessions[i];
        if (config_owns(sn->cfg, session_listener(s)) || config_owns(sn->cfg, session_rule(s)) ||
            config_owns(sn->cfg, session_upstream(s)))
            return 1;
    }
    struct pool_node *n;
    LIST_FOREACH(n, &gw->pools, entry)
        if (config_owns(sn->cfg, pool_upstream(n->pool)))
            return 1;
    struct dyn_upstream *d; /* their tls and sasl entries are the template's */
    LIST_FOREACH(d, &gw->dyns, entry)
        if (d->sn == sn)
            return 1;
    return 0;
}

/* Free the old snapshots nothing points into any more. Closed sessions and emptied pools
 * wait on the reap list (and may still read their entries): it is run first. A link saying
 * goodbye belongs to no pool and still reads its upstream entry: while any is retiring,
 * nothing is freed (they are gone within 2 s). */
static void snapshots_collect(struct vm_gateway *gw)
{
    if (LIST_EMPTY(&gw->old))
        return;
    reaper_run(gw->reaper);
    if (!TAILQ_EMPTY(&gw->retiring))
        return;
    struct snapshot *sn, *next;
    for (sn = LIST_FIRST(&gw->old); sn; sn = next) {
        next = LIST_NEXT(sn, entry);
        if (snapshot_in_use(gw, sn))
            continue;
        LIST_REMOVE(sn, entry);
        snapshot_free(sn);
        vm_debug(NULL, "reload: an earlier configuration is no longer used: freed");
    }
}

#define SWAP(a, b)                                                                                 \
    do {                                                                                           \
        __typeof__(a) tmp_ = (a);                                                                  \
        (a) = (b);                                                                                 \
        (b) = tmp_;                                                                                \
    } while (0)

static int same_string(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

/* Step 2: the running values move into `nc`, the values read go with the old snapshot. */
static void keep_restart_keys(struct vm_config *oc, struct vm_config *nc)
{
    if (!same_string(oc->process_user, nc->process_user) ||
        !same_string(oc->process_group, nc->process_group))
        vm_warn(NULL, "reload: process.user/process.group changed: this needs a restart; "
                "keeping the running ones");
    SWAP(oc->process_user, nc->process_user);
    SWAP(oc->process_group, nc->process_group);
    if (!same_string(oc->admin_address, nc->admin_address) ||
        !same_string(oc->admin_unix, nc->admin_unix))
        vm_warn(NULL, "reload: admin.address/admin.unix changed: this needs a restart; "
                "keeping the running endpoint");
    SWAP(oc->admin_address, nc->admin_address);
    SWAP(oc->admin_unix, nc->admin_unix);
    /* cyrus-sasl is set up once, with the running section (auth.c keeps a pointer to it). A
     * first sasl section is set up by the caller. */
    if (oc->sasl) {
        if (!config_sasl_same(oc->sasl, nc->sasl))
            vm_warn(NULL, "reload: the sasl section changed: this needs a restart; keeping "
                    "the running one");
        SWAP(oc->sasl, nc->sasl);
    }
}

static int clashes(const struct vm_listener_cfg *a, const struct vm_listener_cfg *b)
{
    return (a->address && same_string(a->address, b->address)) ||
           (a->unix_path && same_string(a->unix_path, b->unix_path));
}

/* Step 3. `nl` gets one listener per entry of `nc` (NULL where binding failed after the
 * point of no return); `keep[j]` says old listener j lives on. -1: nothing changed. */
static int swap_listeners(struct vm_gateway *gw, struct vm_config *nc, struct vm_listener **nl,
                          int *keep, int *opened, int *closed)
{
    struct vm_config *oc = gw->cfg;
    int *later = vm_calloc((size_t)nc->nlisteners, sizeof(int));
    for (int i = 0; i < nc->nlisteners; i++) {
        const struct vm_listener_cfg *want = &nc->listeners[i];
        for (int j = 0; j < oc->nlisteners; j++) {
            if (!keep[j] && gw->listeners[j] && same_string(oc->listeners[j].name, want->name) &&
                config_listener_same_socket(&oc->listeners[j], want)) {
                keep[j] = 1;
                nl[i] = gw->listeners[j];
                break;
            }
        }
    }
    for (int i = 0; i < nc->nlisteners; i++) {
        if (nl[i])
            continue;
        for (int j = 0; j < oc->nlisteners; j++)
            if (!keep[j] && clashes(&nc->listeners[i], &oc->listeners[j]))
                later[i] = 1;
        if (later[i])
            continue;
        nl[i] = listener_new(gw->base, &nc->listeners[i], &gateway_listener_ops, gw,
                             nc->auth_timeout_s * 1000);
        if (!nl[i]) {
            vm_err(NULL, "reload refused: listeners[%d] (%s) cannot be opened; keeping the "
                   "running configuration", i, nc->listeners[i].name);
            for (int k = 0; k < nc->nlisteners; k++) {
                int kept = 0;
                for (int j = 0; j < oc->nlisteners; j++)
                    kept |= keep[j] && gw->listeners[j] == nl[k];
                if (nl[k] && !kept)
                    listener_free(nl[k]);
            }
            free(later);
            return -1;
        }
        (*opened)++;
    }
    /* The point of no return: old sockets that go are closed (unix files removed). */
    for (int j = 0; j < oc->nlisteners; j++) {
        if (keep[j] || !gw->listeners[j])
            continue;
        listener_free(gw->listeners[j]);
        gw->listeners[j] = NULL;
        (*closed)++;
    }
    for (int i = 0; i < nc->nlisteners; i++) {
        if (!later[i])
            continue;
        nl[i] = listener_new(gw->base, &nc->listeners[i], &gateway_listener_ops, gw,
                             nc->auth_timeout_s * 1000);
        if (nl[i])
            (*opened)++;
        else
            vm_err(NULL, "reload: listeners[%d] (%s) could not be reopened: it stays closed "
                   "until the next reload", i, nc->listeners[i].name);
    }
    free(later);
    return 0;
}

static void log_upstream_changes(const struct vm_config *oc, const struct vm_config *nc)
{
    for (int i = 0; i < nc->nupstreams; i++) {
        const struct vm_upstream_cfg *was = config_upstream(oc, nc->upstreams[i].name);
        if (!was)
            vm_info(NULL, "reload: upstream %s added: %s", nc->upstreams[i].name,
                    nc->upstreams[i].uri_text);
        else if (!config_upstream_same(was, &nc->upstreams[i]))
            vm_info(NULL, "reload: upstream %s changed: new sessions get new connections; "
                    "the old ones serve their sessions until they leave", was->name);
    }
    for (int i = 0; i < oc->nupstreams; i++)
        if (!config_upstream(nc, oc->upstreams[i].name))
            vm_info(NULL, "reload: upstream %s removed: its sessions keep working until they "
                    "leave; new ones cannot reach it", oc->upstreams[i].name);
}

int gateway_reload(struct vm_gateway *gw, const char *path)
{
    if (gw->drain.on) {
        vm_warn(NULL, "reload ignored: virtmux is draining");
        return -1;
    }
    char *errs = NULL;
    size_t nerrs = 0;
    FILE *ef = open_memstream(&errs, &nerrs);
    struct vm_config *nc = config_load(path, ef ? ef : stderr);
    if (ef)
        fclose(ef);
    if (!nc) {
        for (char *line = errs, *end; line && *line; line = end) {
            end = line + strcspn(line, "\n");
            if (*end)
                *end++ = '\0';
            vm_err(NULL, "reload: %s", line);
        }
        vm_err(NULL, "reload refused: %s is invalid; keeping the running configuration", path);
        free(errs);
        return -1;
    }
    free(errs);
    struct snapshot *sn = snapshot_new(nc);
    if (snapshot_load_tls(sn) < 0) {
        vm_err(NULL, "reload refused: keeping the running configuration");
        snapshot_free(sn);
        return -1;
    }
    struct vm_config *oc = gw->cfg;
    struct vm_listener **nl = vm_calloc((size_t)nc->nlisteners + 1, sizeof(*nl));
    int *keep = vm_calloc((size_t)oc->nlisteners + 1, sizeof(int));
    int opened = 0, closed = 0;
    if (swap_listeners(gw, nc, nl, keep, &opened, &closed) < 0) {
        free(nl);
        free(keep);
        snapshot_free(sn);
        return -1;
    }
    keep_restart_keys(oc, nc);
    if (!oc->sasl && nc->sasl && auth_global_init(nc->sasl) < 0)
        vm_err(NULL, "reload: cyrus-sasl could not be set up: SASL logins will fail");
    for (int i = 0; i < nc->nlisteners; i++) {
        for (int j = 0; j < oc->nlisteners; j++) {
            if (keep[j] && gw->listeners[j] == nl[i]) {
                listener_set_cfg(nl[i], &nc->listeners[i]);
                (void)listener_reload_tls(nl[i]);
            }
        }
    }
    log_upstream_changes(oc, nc);
    free(keep);
    free(gw->listeners);
    gw->listeners = nl;
    LIST_INSERT_HEAD(&gw->old, gw->snap, entry);
    gw->snap = sn;
    gw->cfg = nc;
    gw->env.cfg = nc;
    /* New upstreams and listeners have their counters from now on (at zero). */
    for (int i = 0; i < nc->nupstreams; i++)
        (void)metrics_upstream(gw->metrics, nc->upstreams[i].name);
    for (int i = 0; i < nc->nlisteners; i++)
        (void)metrics_listener(gw->metrics, nc->listeners[i].name);
    /* max_clients may have moved; new listeners follow the accepting state. */
    int accept_now = gw->nsessions < nc->max_clients;
    if (accept_now != gw->accepting)
        set_accepting(gw, accept_now);
    else if (!accept_now)
        for (int i = 0; i < nc->nlisteners; i++)
            if (nl[i])
                listener_set_enabled(nl[i], 0);
    if (!nc->policy_present)
        vm_info(NULL, "no policy section: every client may reach every upstream read-write");
    vm_info(NULL, "reloaded %s: %d listeners (%d opened, %d closed), %d upstreams, %d policy "
            "rules; sessions already open keep their settings", path, nc->nlisteners, opened,
            closed, nc->nupstreams, nc->nrules);
    snapshots_collect(gw);
    return 0;
}
