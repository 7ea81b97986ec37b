#include "reap.h"

#include <stdlib.h>

#include <event2/event.h>

#include "util.h"

struct reap_node {
    void (*fn)(void *);
    void *p;
    struct reap_node *next;
};

struct vm_reaper {
    struct event *ev;        /* owned: fires once after the turn that deferred something */
    struct reap_node *head;  /* owned */
};

static void reap_cb(evutil_socket_t fd, short what, void *arg)
{
    reaper_run(arg);
}

struct vm_reaper *reaper_new(struct event_base *base)
{
    struct vm_reaper *r = vm_calloc(1, sizeof(*r));
    r->ev = event_new(base, -1, 0, reap_cb, r);
    if (!r->ev)
        abort();
    return r;
}

void reaper_defer(struct vm_reaper *r, void (*fn)(void *), void *p)
{
    struct reap_node *n = vm_calloc(1, sizeof(*n));
    n->fn = fn;
    n->p = p;
    n->next = r->head;
    r->head = n;
    event_active(r->ev, 0, 0);
}

void reaper_run(struct vm_reaper *r)
{
    while (r->head) {
        struct reap_node *n = r->head;
        r->head = n->next;
        n->fn(n->p);
        free(n);
    }
}

void reaper_free(struct vm_reaper *r)
{
    if (!r)
        return;
    reaper_run(r);
    event_free(r->ev);
    free(r);
}
