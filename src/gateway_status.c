/* What the gateway reports: GET /status (JSON), GET /metrics (the gauges of live objects, then
 * metrics.c's counters) and the SIGUSR1 log lines. Reads the gateway's state; changes nothing. */
#include "gateway.h"
#include "gateway_int.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "audit.h"
#include "cache.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "session.h"
#include "srccount.h"
#include "stream.h"
#include "util.h"

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
