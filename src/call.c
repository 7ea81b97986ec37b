/* The call record's life: made by its owner, ended once by the layer that carries it.
 *
 * Records are recycled: a freed record keeps its (empty) packet buffer and goes on a small
 * free list, so a forwarded call costs no allocation once the gateway is warm. The list is
 * capped, and call_cache_trim (run periodically by the gateway) gives back half of what has
 * not been used since the last trim, so an idle gateway returns to its resting size. */
#include "call.h"

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "util.h"

#define CACHE_MAX 1024

static struct vm_call *cache;  /* free records, linked through qentry.tqe_next */
static int ncache, low_water; /* low_water: the fewest cached since the last trim */

static struct vm_call *take_cached(void)
{
    struct vm_call *c = cache;
    if (!c)
        return NULL;
    cache = TAILQ_NEXT(c, qentry);
    if (--ncache < low_water)
        low_water = ncache;
    return c;
}

struct vm_call *call_new(vm_call_done_fn done, void *arg, int internal)
{
    struct vm_call *c = take_cached();
    struct evbuffer *pkt = c ? c->pkt : evbuffer_new();
    if (!c)
        c = vm_calloc(1, sizeof(*c));
    else
        memset(c, 0, sizeof(*c));
    if (!pkt)
        abort();
    c->pkt = pkt;
    c->done = done;
    c->done_arg = arg;
    c->internal = internal;
    return c;
}

void call_swallow(struct vm_call *c)
{
    c->done = NULL;
    c->done_arg = NULL;
}

static void destroy(struct vm_call *c)
{
    if (c->pkt)
        evbuffer_free(c->pkt);
    free(c);
}

void call_free(struct vm_call *c)
{
    free(c->grant_note);
    c->grant_note = NULL;
    if (ncache >= CACHE_MAX || !c->pkt) {
        destroy(c);
        return;
    }
    evbuffer_drain(c->pkt, evbuffer_get_length(c->pkt));
    TAILQ_NEXT(c, qentry) = cache;
    cache = c;
    ncache++;
}

void call_cache_trim(int all)
{
    for (int n = all ? ncache : low_water / 2; n > 0; n--)
        destroy(take_cached());
    low_water = ncache;
}

void call_finish(struct vm_call *c, struct evbuffer *pkt)
{
    if (c->done) {
        struct vm_hdr h;
        wire_hdr_peek(pkt, &h);
        c->done(c->done_arg, c, &h, pkt, NULL);
    }
    call_free(c);
}

void call_fail(struct vm_call *c, int code, int domain, const char *message)
{
    if (c->done) {
        struct vm_call_error err = {code, domain, message};
        c->done(c->done_arg, c, NULL, NULL, &err);
    }
    call_free(c);
}
