/* Counters per client source (identity_source: a TCP address or "uid=N"), used to cap the
 * unauthenticated sockets one source may hold. An entry lives only while its count is above
 * zero, so the table never has more entries than sockets counted, whatever the number of
 * sources seen over time. */
#ifndef VM_SRCCOUNT_H
#define VM_SRCCOUNT_H

#include "fwd.h"

struct vm_srccount;

struct vm_srccount *srccount_new(void);
void srccount_free(struct vm_srccount *t);
/* Count one more for `source` unless it already holds `max`: 0, or -1 (nothing counted). */
int srccount_acquire(struct vm_srccount *t, const char *source, int max) VM_WUR;
/* Give one back; the entry goes away at zero. A source not in the table is ignored. */
void srccount_release(struct vm_srccount *t, const char *source);
/* What `source` holds now (0 when absent), and how many sources hold anything. */
int srccount_get(const struct vm_srccount *t, const char *source);
int srccount_sources(const struct vm_srccount *t);

#endif
