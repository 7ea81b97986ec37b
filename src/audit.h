/* Audit of policy denials: every denial is logged with identity, procedure and upstream, and
 * counted per (identity, procedure, upstream). */
#ifndef VM_AUDIT_H
#define VM_AUDIT_H

#include <jansson.h>

struct vm_audit;

struct vm_audit *audit_new(void);
void audit_free(struct vm_audit *a);
/* Record one denial (and log it at warn level under `tag`). */
void audit_denied(struct vm_audit *a, const char *tag, const char *identity, const char *proc,
                  const char *upstream, const char *reason);
/* Total denials recorded. */
unsigned long audit_total(const struct vm_audit *a);
/* The counters as a JSON array of {identity, procedure, upstream, count}; caller owns it. */
json_t *audit_json(const struct vm_audit *a);

#endif
