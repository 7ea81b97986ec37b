/* Counters for GET /metrics: plain data every layer may increment (reachable as env->metrics,
 * like the audit log), rendered in the Prometheus text format by metrics_render and the
 * writer helpers below (the only place that knows the format).
 *
 *   session, pool, link, events, gateway ──increment──> vm_metrics (arrays, indexed)
 *   admin GET /metrics ──> gateway (gauges of live objects) ──> metrics_write_* / _render
 *
 * The hot path is an array index: an upstream or a listener gets a slot once (when its pool
 * or session is made), a procedure's histogram is found by its index in the procedure table
 * and allocated on its first call. Nothing hashes or allocates per call. Slots are kept by
 * name for the process's life, so counters survive anything that rebuilds the config. */
#ifndef VM_METRICS_H
#define VM_METRICS_H

#include <stdint.h>

struct evbuffer;
struct vm_metrics;
struct vm_proc_info;

/* Bytes of libvirt packets in and out of one connection's owner (counted by conn.c). */
struct vm_bytes {
    uint64_t in, out;
};

/* Every place that refuses or holds something back at a configured or built-in bound. */
enum vm_limit {
    VM_LIMIT_MAX_CLIENTS,               /* listeners stop accepting */
    VM_LIMIT_MAX_UNAUTHENTICATED,       /* closed on accept */
    VM_LIMIT_MAX_UNAUTHENTICATED_PER_SOURCE,
    VM_LIMIT_AUTH_TIMEOUT,              /* closed: not authenticated in time */
    VM_LIMIT_SASL_MAX_FAILURES,         /* SASL attempt refused: source blocked */
    VM_LIMIT_RULE_MAX_SESSIONS,         /* CONNECT_OPEN denied: policy max_sessions */
    VM_LIMIT_MAX_CLIENT_REQUESTS,       /* client not read: calls outstanding */
    VM_LIMIT_OUTSTANDING_BYTES,         /* client not read: call bytes outstanding */
    VM_LIMIT_CLIENT_OUTPUT,             /* client not read: it does not read its replies */
    VM_LIMIT_STREAM_UPLOAD,             /* client not read: libvirtd is slow on a stream */
    VM_LIMIT_MAX_INFLIGHT,              /* call queued: every connection at max_inflight */
    VM_LIMIT_QUEUE_TIMEOUT,             /* queued call failed after queue_timeout_ms */
    VM_LIMIT_MAX_STREAMS,               /* stream waits for a slot */
    VM_LIMIT_STREAM_QUEUE_TIMEOUT,      /* ... and failed after queue_timeout_ms */
    VM_LIMIT_EVENTS_PER_SESSION,        /* registration refused: events.max_per_session */
    VM_LIMIT_EVENT_QUEUE_BYTES,         /* subscriber cut off: events.max_queue_bytes */
    VM_LIMIT_EVENT_ARGS,                /* registration refused: arguments over 8 KiB */
    VM_LIMIT_INTERNAL_RESERVE,          /* the gateway's own call waits: reserve full */
    VM_LIMIT_FRAME_LENGTH,              /* client closed: illegal length word */
    VM_LIMIT_NAME_LENGTH,               /* CONNECT_OPEN refused: name too long */
    VM_LIMIT_RECONNECT_HOLD,            /* held call, open or registration failed after
                                         * pool.reconnect_hold_ms (upstream away or paused) */
    VM_LIMIT_MAX_UPSTREAMS,             /* CONNECT_OPEN refused: limits.max_upstreams */
    VM_LIMIT__COUNT
};

/* Why a client got an error, or a connection broke. */
enum vm_error_kind {
    VM_ERRK_UPSTREAM,     /* libvirtd answered a forwarded call with an error */
    VM_ERRK_TIMEOUT,      /* the gateway's own: operation timed out */
    VM_ERRK_DENIED,       /* policy, read-only */
    VM_ERRK_UNSUPPORTED,  /* not relayed (FD passing, legacy events) */
    VM_ERRK_RPC,          /* malformed or out-of-order call (decode, auth required) */
    VM_ERRK_NO_CONNECT,   /* CONNECT_OPEN could not be routed */
    VM_ERRK_INTERNAL,     /* upstream unreachable, connection lost, not open */
    VM_ERRK_AUTH,         /* authentication failed */
    VM_ERRK_OTHER,        /* any other code of the gateway's own */
    VM_ERRK_PROTOCOL,     /* a client closed for breaking the protocol */
    VM_ERRK_LINK_DOWN,    /* an upstream connection failed or was lost */
    VM_ERRK__COUNT
};

/* How an authentication failed (label "mechanism"). */
enum vm_auth_mech {
    VM_AUTHM_TLS,         /* client certificate refused */
    VM_AUTHM_SCRAM_SHA_256,
    VM_AUTHM_DIGEST_MD5,
    VM_AUTHM_GSSAPI,
    VM_AUTHM_SASL_OTHER,  /* before a mechanism was chosen, or an unknown one */
    VM_AUTHM__COUNT
};

/* Coalescing and the micro-cache (cache.c), per upstream. */
enum vm_cache_stat {
    VM_CACHE_HIT,               /* answered from a stored reply */
    VM_CACHE_MISS,              /* a cacheable call not answered from the cache */
    VM_CACHE_COALESCED,         /* a call that joined an identical one in flight */
    VM_CACHE_INVALIDATED_WRITE, /* a write call through the gateway */
    VM_CACHE_INVALIDATED_EVENT, /* a lifecycle event */
    VM_CACHE_INVALIDATED_LINK,  /* a link of the pool went down */
    VM_CACHE__COUNT
};

struct vm_metrics *metrics_new(void);
void metrics_free(struct vm_metrics *m);

/* The slot of upstream / listener `name`, made on first use (never freed before
 * metrics_free). Call once per object, not per call. */
int metrics_upstream(struct vm_metrics *m, const char *name);
int metrics_listener(struct vm_metrics *m, const char *name);
/* Stable counters for conn.c to add to. */
/* Forget upstream slot `up` (an upstream made from a template was freed and nothing holds
 * its index any more): its counters leave /metrics and the slot is reused for a new name,
 * so names that come and go do not grow the gateway. */
void metrics_upstream_forget(struct vm_metrics *m, int up);
struct vm_bytes *metrics_upstream_bytes(struct vm_metrics *m, int up);
struct vm_bytes *metrics_listener_bytes(struct vm_metrics *m, int lis);

/* Monotonic nanoseconds, for call latencies. */
uint64_t metrics_now_ns(void);
/* A forwarded call of procedure `info` (NULL: unknown) to upstream slot `up` took
 * `now - t0_ns`. */
void metrics_call(struct vm_metrics *m, int up, const struct vm_proc_info *info, uint64_t t0_ns);
void metrics_limit(struct vm_metrics *m, enum vm_limit what);
void metrics_error(struct vm_metrics *m, enum vm_error_kind kind);
/* An error reply of the gateway's own with libvirt error `code`, counted by its kind. */
void metrics_error_code(struct vm_metrics *m, int code);
void metrics_auth_failure(struct vm_metrics *m, int lis, enum vm_auth_mech mech);
/* The mechanism a client named at AUTH_SASL_START, as a label (unknown names: other). */
enum vm_auth_mech metrics_sasl_mech(const char *name);
void metrics_session_accepted(struct vm_metrics *m, int lis);
/* The upstream's last connection failure (NULL: reached since), kept past its pools' life for
 * the admin status. */
void metrics_upstream_error(struct vm_metrics *m, int up, const char *message);
const char *metrics_upstream_last_error(const struct vm_metrics *m, int up);
void metrics_subscriber_dropped(struct vm_metrics *m, int up);
void metrics_events_delivered(struct vm_metrics *m, int up, unsigned n);
void metrics_cache(struct vm_metrics *m, int up, enum vm_cache_stat what);

/* ---- rendering (Prometheus text exposition format 0.0.4) ---- */

#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* Every counter and histogram above, with HELP and TYPE lines. */
void metrics_render(const struct vm_metrics *m, struct evbuffer *out);
/* The HELP and TYPE lines of family `name` ("gauge", "counter"). */
void metrics_write_family(struct evbuffer *out, const char *name, const char *type,
                          const char *help);
/* One sample: `name{k1="v1",...} value`; `labels` alternates keys and values and ends with
 * NULL; values are escaped (backslash, quote, newline). */
void metrics_write_sample(struct evbuffer *out, const char *name, const char *const *labels,
                          double value);

#endif
