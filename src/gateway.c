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
#include "gateway_int.h"

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


static const struct vm_session_host_ops gateway_host_ops;


static void dyns_collect(struct vm_gateway *gw);
static void give_back(struct vm_gateway *gw);

/* An upstream made from a template lost its last pool: free it (and an old snapshot it was
 * keeping) once its connections' goodbyes are over (at most 2 s), not at the next trim. */
static void dyn_sweep_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    int had = gw->ndyns;
    dyns_collect(gw);
    gateway_snapshots_collect(gw);
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
    gateway_snapshots_collect(gw);
    if (gw->pools_freed || gw->npools == 0) /* idle: links that said goodbye since, too */
        give_back(gw);
}

struct snapshot *gateway_snapshot_new(struct vm_config *cfg)
{
    struct snapshot *sn = vm_calloc(1, sizeof(*sn));
    sn->cfg = cfg;
    sn->rule_sessions = vm_calloc((size_t)cfg->nrules + 1, sizeof(int));
    sn->upstream_tls = vm_calloc((size_t)cfg->nupstreams, sizeof(SSL_CTX *));
    sn->template_tls = vm_calloc((size_t)cfg->ntemplates + 1, sizeof(SSL_CTX *));
    return sn;
}

void gateway_snapshot_free(struct snapshot *sn)
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
int gateway_snapshot_load_tls(struct snapshot *sn)
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
    gw->snap = gateway_snapshot_new(cfg);
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
    if (gateway_snapshot_load_tls(gw->snap) < 0)
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


void gateway_close_listeners(struct vm_gateway *gw)
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
        /* Not here: the reaper is running, and gateway_snapshots_collect runs it. */
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
    gateway_close_listeners(gw);
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
        gateway_snapshot_free(sn);
    }
    gateway_snapshot_free(gw->snap);
    free(gw);
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

void gateway_set_accepting(struct vm_gateway *gw, int on)
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
        gateway_set_accepting(gw, 0);
}

static void host_closed(void *owner, struct vm_session *s)
{
    struct vm_gateway *gw = owner;
    int slot = session_slot(s);
    struct vm_session *last = gw->sessions[gw->nsessions - 1];
    gw->sessions[slot] = last;
    session_set_slot(last, slot);
    if (--gw->nsessions < gw->cfg->max_clients)
        gateway_set_accepting(gw, 1);
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

const struct vm_listener_ops gateway_listener_ops = {
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

int gateway_draining(const struct vm_gateway *gw)
{
    return gw->drain.on;
}


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
void gateway_snapshots_collect(struct vm_gateway *gw)
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
        gateway_snapshot_free(sn);
        vm_debug(NULL, "reload: an earlier configuration is no longer used: freed");
    }
}

