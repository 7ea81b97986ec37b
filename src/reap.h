/* Deferred frees: objects are never freed inside their own callbacks. They go on a list that
 * an event empties after the current loop turn (pgbouncer's just-freed lists, redis'
 * deferred close). The gateway owns the one reaper and hands it to whoever frees objects. */
#ifndef VM_REAP_H
#define VM_REAP_H

struct event_base;
struct vm_reaper;

struct vm_reaper *reaper_new(struct event_base *base);
/* Run fn(p) after the current loop turn. */
void reaper_defer(struct vm_reaper *r, void (*fn)(void *), void *p);
/* Run everything deferred so far, now (shutdown). */
void reaper_run(struct vm_reaper *r);
/* Runs what is left, then frees the reaper. */
void reaper_free(struct vm_reaper *r);

#endif
