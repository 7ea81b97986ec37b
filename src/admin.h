/* The admin endpoint: HTTP on a loopback address or a unix socket, GET /status returns the
 * gateway's state as JSON (sessions, pools, upstream connections, policy denials). */
#ifndef VM_ADMIN_H
#define VM_ADMIN_H

#include <jansson.h>

#include "fwd.h"

struct event_base;
struct vm_admin;

/* The state to serve at GET /status, made fresh for each request; the caller owns it. */
typedef json_t *(*vm_status_fn)(void *owner);

/* Start the endpoint configured in `cfg->admin_*`; NULL after logging why. */
struct vm_admin *admin_new(struct event_base *base, const struct vm_config *cfg,
                           vm_status_fn status, void *owner);
/* An operator action on an upstream (POST /upstreams/NAME/ACTION, ACTION one of pause,
 * resume, drain): 0 and the new state in *state, -1 unknown upstream, -2 unknown action. */
typedef int (*vm_upstream_action_fn)(void *owner, const char *upstream, const char *action,
                                     const char **state);
/* Serve POST /upstreams/NAME/ACTION through `fn` (same owner as the status). */
void admin_set_upstream_action(struct vm_admin *a, vm_upstream_action_fn fn);
void admin_free(struct vm_admin *a);

#endif
