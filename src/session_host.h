/* What a session asks of its owner (the gateway): types only, shared by session.h and the
 * session's internal files. The owner implements the ops; the session never names it. */
#ifndef VM_SESSION_HOST_H
#define VM_SESSION_HOST_H

#include <stddef.h>

#include "fwd.h"

struct vm_env;
struct vm_rule;

/* Clients still authenticating are bounded; the host says whether one more may be. */
enum vm_unauth {
    VM_UNAUTH_OK,
    VM_UNAUTH_FULL,        /* limits.max_unauthenticated clients are authenticating */
    VM_UNAUTH_SOURCE_FULL, /* this source holds limits.max_unauthenticated_per_source */
};

/* What a session asks of the object that owns it (the gateway), given at session_new. */
struct vm_session_host_ops {
    /* The pool for (upstream, name, read-only), made if needed. */
    struct vm_pool *(*pool)(void *owner, const struct vm_upstream_cfg *up, const char *name,
                            int readonly);
    /* The same for an upstream not made yet: the one called `upname` made from template
     * `tpl` (found if it exists). NULL with the client-facing reason in err when it cannot be
     * made (limits.max_upstreams, a URI that does not parse once {name} is filled in). */
    struct vm_pool *(*template_pool)(void *owner, const struct vm_upstream_cfg *tpl,
                                     const char *upname, const char *name, int readonly,
                                     char *err, size_t errlen);
    /* The session let go of pool `p`; the owner frees it (later) if nothing else uses it. */
    void (*pool_check)(void *owner, struct vm_pool *p);
    /* max_sessions per policy rule: -1 when the rule is full. */
    int (*rule_acquire)(void *owner, const struct vm_rule *rule);
    void (*rule_release)(void *owner, const struct vm_rule *rule);
    /* The registry and max_clients: a session exists from opened to closed. */
    void (*opened)(void *owner, struct vm_session *s);
    void (*closed)(void *owner, struct vm_session *s);
    /* A slot for a client still authenticating from `source` (identity_source), and its
     * release with the same source once authenticated or gone. */
    enum vm_unauth (*unauth_acquire)(void *owner, const char *source);
    void (*unauth_release)(void *owner, const char *source);
    /* A call that may change upstream `up` was sent or answered: its pools' micro-caches
     * must forget what they hold. */
    void (*upstream_write)(void *owner, const struct vm_upstream_cfg *up);
};

struct vm_session_host {
    const struct vm_session_host_ops *ops;
    void *owner;
    struct vm_env *env;
};

#endif
