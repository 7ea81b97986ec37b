#include "util.h"

#include <stdlib.h>
#include <string.h>

void *vm_calloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        abort();
    return p;
}

char *vm_strdup(const char *s)
{
    char *d = strdup(s);
    if (!d)
        abort();
    return d;
}

char *vm_strndup(const char *s, size_t n)
{
    char *d = strndup(s, n);
    if (!d)
        abort();
    return d;
}

int vm_streq(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}
