/*
 * Per-source counters. A flat array searched linearly: it holds one entry per source with
 * an unauthenticated socket, at most limits.max_unauthenticated of them, and it is touched
 * once per accept and once per authentication, never per packet.
 */
#include "srccount.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct src_entry {
    char source[64];
    int count; /* > 0 while the entry exists */
};

struct vm_srccount {
    struct src_entry *v; /* owned; n used of cap */
    int n, cap;
};

struct vm_srccount *srccount_new(void)
{
    return vm_calloc(1, sizeof(struct vm_srccount));
}

void srccount_free(struct vm_srccount *t)
{
    if (!t)
        return;
    free(t->v);
    free(t);
}

static struct src_entry *find(const struct vm_srccount *t, const char *source)
{
    for (int i = 0; i < t->n; i++)
        if (strcmp(t->v[i].source, source) == 0)
            return &t->v[i];
    return NULL;
}

static void resize(struct vm_srccount *t, int cap)
{
    struct src_entry *v = realloc(t->v, (size_t)(cap ? cap : 1) * sizeof(*v));
    if (!v)
        abort();
    t->v = v;
    t->cap = cap;
}

int srccount_acquire(struct vm_srccount *t, const char *source, int max)
{
    struct src_entry *e = find(t, source);
    if (e) {
        if (e->count >= max)
            return -1;
        e->count++;
        return 0;
    }
    if (max < 1)
        return -1;
    if (t->n == t->cap)
        resize(t, t->cap ? t->cap * 2 : 8);
    e = &t->v[t->n++];
    snprintf(e->source, sizeof(e->source), "%s", source);
    e->count = 1;
    return 0;
}

void srccount_release(struct vm_srccount *t, const char *source)
{
    struct src_entry *e = find(t, source);
    if (!e || --e->count > 0)
        return;
    *e = t->v[--t->n]; /* order does not matter: move the last entry into the hole */
    if (t->cap > 8 && t->n < t->cap / 4)
        resize(t, t->cap / 2); /* a burst of sources leaves no large array behind */
}

int srccount_get(const struct vm_srccount *t, const char *source)
{
    const struct src_entry *e = find(t, source);
    return e ? e->count : 0;
}

int srccount_sources(const struct vm_srccount *t)
{
    return t->n;
}
