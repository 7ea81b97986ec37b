/* The admin endpoint: HTTP on a loopback address or a unix socket. GET /status returns the
 * gateway's state as JSON, GET /healthz answers load balancers; HEAD works wherever GET does.
 * Everything it serves comes from callbacks its owner (the gateway) hands down. */
#ifndef VM_ADMIN_H
#define VM_ADMIN_H

#include <jansson.h>

#include "fwd.h"

struct event_base;
struct vm_admin;

/* What the admin endpoint asks its owner. */
struct vm_admin_ops {
    /* GET /status: the state, made fresh for each request; the caller owns it. */
    json_t *(*status)(void *owner);
    /* GET /healthz: the HTTP status to answer (200 while serving) and its one-word body
     * ("ok", "draining"), a static string. */
    int (*health)(void *owner, const char **word);
};

/* Start the endpoint configured in `cfg->admin_*`; NULL after logging why. `ops` and `owner`
 * must outlive it. */
struct vm_admin *admin_new(struct event_base *base, const struct vm_config *cfg,
                           const struct vm_admin_ops *ops, void *owner);
void admin_free(struct vm_admin *a);

#endif
