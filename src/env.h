/* What every engine object may use, owned by the gateway and handed down at creation: the
 * event loop, the reaper for deferred frees, the config snapshot, the audit log, the metrics
 * counters and the id counter behind every log tag (C#, U#). Plain data: no module depends on
 * another through it. */
#ifndef VM_ENV_H
#define VM_ENV_H

struct event_base;
struct vm_audit;
struct vm_metrics;
struct vm_config;
struct vm_reaper;
struct vm_link_list;

struct vm_env {
    struct event_base *base;
    struct vm_reaper *reaper;
    const struct vm_config *cfg;
    struct vm_audit *audit;
    struct vm_metrics *metrics;  /* counters for GET /metrics (metrics.h) */
    struct vm_link_list *retiring; /* links saying goodbye, in no pool (freed at shutdown) */
    unsigned next_id;
};

static inline unsigned env_next_id(struct vm_env *e)
{
    return ++e->next_id;
}

#endif
