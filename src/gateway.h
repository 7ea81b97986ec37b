/* The gateway: owns the event base binding, the config snapshot, the listeners and the pools,
 * and counts sessions against max_clients. */
#ifndef VM_GATEWAY_H
#define VM_GATEWAY_H

#include "fwd.h"
#include "pool.h"

#include <event2/util.h>
#include <jansson.h>

struct event_base;
struct vm_audit;
struct vm_rule;

/* Takes ownership of `cfg`. */
struct vm_gateway *gateway_new(struct event_base *base, struct vm_config *cfg);
/* Bind every listener. Returns -1 (after logging) if any fails. */
int gateway_start(struct vm_gateway *gw) VM_WUR;
/* After the loop has stopped: close every session, then free pools, links and everything
 * else the gateway owns. */
void gateway_free(struct vm_gateway *gw);
/* SIGHUP: read and validate the whole file at `path` and swap it in (see gateway.c for what
 * changes and what stays). 0 when swapped in; -1 when the running configuration stays (the
 * reason is logged at error level, with the JSON path of every error). */
int gateway_reload(struct vm_gateway *gw, const char *path);
/* SIGTERM/SIGINT: stop accepting, let outstanding calls finish (limits.drain_timeout_s), close
 * sessions as they go idle, say CONNECT_CLOSE upstream, log a summary and stop the loop.
 * Returns at once; the loop does the rest. A second call does nothing. */
void gateway_drain(struct vm_gateway *gw);
/* True from gateway_drain on (the admin health check answers 503 then). */
int gateway_draining(const struct vm_gateway *gw);
/* Log pools, links and session counts (SIGUSR1). */
void gateway_log_status(struct vm_gateway *gw);

struct event_base *gateway_base(const struct vm_gateway *gw);
/* The TLS client context of a tls:// upstream (NULL for others). */
struct ssl_ctx_st *gateway_upstream_tls(const struct vm_gateway *gw,
                                        const struct vm_upstream_cfg *up);
const struct vm_config *gateway_config(const struct vm_gateway *gw);
unsigned gateway_next_id(struct vm_gateway *gw);
/* The shared environment (loop, reaper, config, audit, ids) handed to pools and sessions. */
struct vm_env *gateway_env(struct vm_gateway *gw);
/* Take over a connected client socket as if listener `lcfg` had accepted it (in-process
 * tests and fuzzers use this; `peer`, `id` and `tls` as for a listener's accept). */
struct vm_identity;
void gateway_adopt(struct vm_gateway *gw, const struct vm_listener_cfg *lcfg, evutil_socket_t fd,
                   const char *peer, const struct vm_identity *id, struct ssl_ctx_st *tls);
/* The pool for (upstream, name, read-only), made if needed (what sessions get at OPEN). */
struct vm_pool *gateway_pool(struct vm_gateway *gw, const struct vm_upstream_cfg *up,
                             const char *name, int readonly);


/* An upstream connection is lost for good: tell every session homed on it. */
void gateway_link_lost(struct vm_gateway *gw, struct vm_link *l, const char *why);

/* Operator actions on upstream `name` (all its pools, and those made later): VM_UP_PAUSED
 * holds new client calls, VM_UP_DRAINING refuses new sessions and closes links as they fall
 * idle, VM_UP_ACTIVE resumes from either. -1 when no upstream has that name. */
int gateway_upstream_set_op(struct vm_gateway *gw, const char *name, enum vm_upstream_op op);
/* The operator state of upstream `name`, or -1 when there is none. */
int gateway_upstream_op(const struct vm_gateway *gw, const char *name);

/* Policy denials are recorded here. */
struct vm_audit *gateway_audit(const struct vm_gateway *gw);


/* The whole state as JSON (admin endpoint); caller owns the result. */
json_t *gateway_status_json(struct vm_gateway *gw);
/* Every metric in the Prometheus text format, appended to `out` (GET /metrics). */
struct evbuffer;
void gateway_metrics(struct vm_gateway *gw, struct evbuffer *out);

/* Free `p` with `fn` after the current loop turn (never free an object inside its own
 * callback). */
void gateway_defer_free(struct vm_gateway *gw, void (*fn)(void *), void *p);
struct vm_reaper *gateway_reaper(const struct vm_gateway *gw);

#endif
