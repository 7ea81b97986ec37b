#include "audit.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"

#define BUCKETS 256

struct entry {
    char *identity, *proc, *upstream;
    unsigned long count;
    struct entry *next;
};

struct vm_audit {
    struct entry *bucket[BUCKETS];
    unsigned long total;
};

struct vm_audit *audit_new(void)
{
    struct vm_audit *a = vm_calloc(1, sizeof(*a));
    return a;
}

void audit_free(struct vm_audit *a)
{
    if (!a)
        return;
    for (int i = 0; i < BUCKETS; i++) {
        struct entry *e = a->bucket[i];
        while (e) {
            struct entry *next = e->next;
            free(e->identity);
            free(e->proc);
            free(e->upstream);
            free(e);
            e = next;
        }
    }
    free(a);
}

static unsigned hash(const char *a, const char *b, const char *c)
{
    unsigned h = 5381;
    for (const char *s = a; *s; s++) h = h * 33 + (unsigned char)*s;
    for (const char *s = b; *s; s++) h = h * 33 + (unsigned char)*s;
    for (const char *s = c; *s; s++) h = h * 33 + (unsigned char)*s;
    return h % BUCKETS;
}

void audit_denied(struct vm_audit *a, const char *tag, const char *identity, const char *proc,
                  const char *upstream, const char *reason)
{
    if (!upstream)
        upstream = "-";
    vm_warn(tag, "denied: identity=%s procedure=%s upstream=%s: %s", identity, proc, upstream,
            reason);
    a->total++;
    unsigned h = hash(identity, proc, upstream);
    for (struct entry *e = a->bucket[h]; e; e = e->next) {
        if (!strcmp(e->identity, identity) && !strcmp(e->proc, proc) &&
            !strcmp(e->upstream, upstream)) {
            e->count++;
            return;
        }
    }
    struct entry *e = vm_calloc(1, sizeof(*e));
    e->identity = vm_strdup(identity);
    e->proc = vm_strdup(proc);
    e->upstream = vm_strdup(upstream);
    e->count = 1;
    e->next = a->bucket[h];
    a->bucket[h] = e;
}

unsigned long audit_total(const struct vm_audit *a)
{
    return a->total;
}

json_t *audit_json(const struct vm_audit *a)
{
    json_t *arr = json_array();
    for (int i = 0; i < BUCKETS; i++)
        for (struct entry *e = a->bucket[i]; e; e = e->next)
            json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:I}", "identity", e->identity,
                                                 "procedure", e->proc, "upstream", e->upstream,
                                                 "count", (json_int_t)e->count));
    return arr;
}
