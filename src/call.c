/* The call record's life: made by its owner, ended once by the layer that carries it. */
#include "call.h"

#include <stdlib.h>

#include <event2/buffer.h>

#include "util.h"

struct vm_call *call_new(vm_call_done_fn done, void *arg, int internal)
{
    struct vm_call *c = vm_calloc(1, sizeof(*c));
    c->done = done;
    c->done_arg = arg;
    c->internal = internal;
    c->pkt = evbuffer_new();
    if (!c->pkt)
        abort();
    return c;
}

void call_swallow(struct vm_call *c)
{
    c->done = NULL;
    c->done_arg = NULL;
}

void call_free(struct vm_call *c)
{
    if (c->pkt)
        evbuffer_free(c->pkt);
    free(c);
}

void call_finish(struct vm_call *c, struct evbuffer *pkt)
{
    if (c->done) {
        struct vm_hdr h;
        wire_hdr_peek(pkt, &h);
        c->done(c->done_arg, c, &h, pkt, NULL);
    }
    evbuffer_free(pkt);
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
