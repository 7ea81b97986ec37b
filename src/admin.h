/* The admin endpoint: HTTP on a loopback address or a unix socket. GET /status returns the
 * gateway's state as JSON, GET /metrics its counters for Prometheus, GET /healthz answers
 * load balancers; HEAD works wherever GET does; POST /sessions/ID/disconnect closes a client;
 * POST /upstreams/NAME/pause|resume|drain puts an upstream into maintenance and back.
 * With admin.token_file every request needs "Authorization: Bearer TOKEN". Everything it
 * serves or does goes through callbacks its owner (the gateway) hands down. */
#ifndef VM_ADMIN_H
#define VM_ADMIN_H

#include <jansson.h>

#include "fwd.h"

struct event_base;
struct evbuffer;
struct vm_admin;

/* What the admin endpoint asks its owner. */
struct vm_admin_ops {
    /* GET /status: the state, made fresh for each request; the caller owns it. */
    json_t *(*status)(void *owner);
    /* GET /healthz: the HTTP status to answer (200 while serving) and its one-word body
     * ("ok", "draining"), a static string. */
    int (*health)(void *owner, const char **word);
    /* GET /metrics: append every metric in the Prometheus text format to `out`. */
    void (*metrics)(void *owner, struct evbuffer *out);
    /* POST /sessions/ID/disconnect: close session `id`; -1 when there is none. */
    int (*disconnect_session)(void *owner, unsigned id);
    /* POST /upstreams/NAME/ACTION, ACTION "pause", "resume" or "drain": 0 and the upstream's
     * new state ("paused", "active", "draining", static) in *state; -1 when there is no such
     * upstream. */
    int (*upstream_action)(void *owner, const char *upstream, const char *action,
                           const char **state);
};

/* Start the endpoint configured in `cfg->admin_*`; NULL after logging why. `ops` and `owner`
 * must outlive it. */
struct vm_admin *admin_new(struct event_base *base, const struct vm_config *cfg,
                           const struct vm_admin_ops *ops, void *owner);
void admin_free(struct vm_admin *a);

#endif
