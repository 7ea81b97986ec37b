/* The gateway's own state, shared by its three files (and no other):
 *   gateway.c         lifetime, listeners, pools, sessions' registry, the callback tables
 *                     (session host, pool, listener, admin), snapshots' lifetime
 *   gateway_status.c  what it reports: GET /status, GET /metrics, SIGUSR1's log lines
 *   gateway_reload.c  what signals do: the drain (SIGTERM/SIGINT), the reload (SIGHUP)
 * gateway_status.c calls nothing in the other two; gateway_reload.c calls into gateway.c;
 * gateway.c calls gateway_status.c only (tools/check-layers.py keeps it so). */
#ifndef VM_GATEWAY_INT_H
#define VM_GATEWAY_INT_H

#include <string.h>
#include <sys/queue.h>
#include <sys/time.h>

#include "config.h"
#include "env.h"
#include "gateway.h"
#include "listener.h"
#include "pool.h"
#include "session_host.h"
#include "upstream.h"

typedef struct ssl_ctx_st SSL_CTX;

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

/* The operator state of upstream `name` (by name: a reload keeps it). */
static inline enum vm_upstream_op op_of(const struct vm_gateway *gw, const char *name)
{
    for (int i = 0; i < gw->nup_ops; i++)
        if (strcmp(gw->up_ops[i].name, name) == 0)
            return gw->up_ops[i].op;
    return VM_UP_ACTIVE;
}

/* Upstreams made from templates that have a pool (idle ones wait in dyns_collect). */
static inline int live_dyns(const struct vm_gateway *gw)
{
    int n = 0;
    struct dyn_upstream *d;
    LIST_FOREACH(d, &gw->dyns, entry)
        n += d->npools > 0;
    return n;
}

static inline struct dyn_upstream *find_dyn(const struct vm_gateway *gw, const struct vm_upstream_cfg *up)
{
    struct dyn_upstream *d;
    LIST_FOREACH(d, &gw->dyns, entry)
        if (&d->up == up)
            return d;
    return NULL;
}


/* In gateway.c, for gateway_reload.c. */
extern const struct vm_listener_ops gateway_listener_ops;
void gateway_set_accepting(struct vm_gateway *gw, int on);
void gateway_close_listeners(struct vm_gateway *gw);
struct snapshot *gateway_snapshot_new(struct vm_config *cfg);
void gateway_snapshot_free(struct snapshot *sn);
int gateway_snapshot_load_tls(struct snapshot *sn);
/* Free the old snapshots nothing points into any more. */
void gateway_snapshots_collect(struct vm_gateway *gw);

#endif
