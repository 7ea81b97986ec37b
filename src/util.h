/* Allocation that cannot fail: the gateway aborts on out-of-memory rather than carry a
 * half-built object through every caller. */
#ifndef VM_UTIL_H
#define VM_UTIL_H

#include <stddef.h>

void *vm_calloc(size_t n, size_t size);
char *vm_strdup(const char *s);
char *vm_strndup(const char *s, size_t n);
/* Equal strings, NULL equal only to NULL. */
int vm_streq(const char *a, const char *b);

#endif
