/* Coalescing in cache.c without any link: calls made here, the shared call ended by hand.
 * Checks who is answered, with what, and that a swallowed or invalidated caller behaves. */
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "cache.h"
#include "call.h"
#include "check.h"
#include "config.h"
#include "env.h"
#include "metrics.h"
#include "proc.h"
#include "wire.h"

struct answer {
    int calls, errors;
    uint32_t serial;         /* the reply's serial as handed over (the session rewrites it) */
    size_t len;
    int code;
};

static void done(void *arg, struct vm_call *c, const struct vm_hdr *reply, struct evbuffer *pkt,
                 const struct vm_call_error *err)
{
    struct answer *a = arg;
    (void)c;
    a->calls++;
    if (reply) {
        a->len = evbuffer_get_length(pkt);
        a->serial = reply->serial;
    } else {
        a->errors++;
        a->code = err->code;
    }
}

/* A client call with `serial` and argument word `arg` (LIST_ALL_DOMAINS: need_results, flags). */
static struct vm_call *client_call(struct answer *a, int32_t proc, uint32_t serial, uint32_t arg)
{
    struct vm_call *c = call_new(done, a, 0);
    uint8_t args[8] = {0, 0, 0, 1, (uint8_t)(arg >> 24), (uint8_t)(arg >> 16),
                       (uint8_t)(arg >> 8), (uint8_t)arg};
    wire_put_packet(c->pkt, VM_PROG_REMOTE, proc, VM_CALL, serial, VM_STATUS_OK, args,
                    sizeof(args));
    wire_hdr_peek(c->pkt, &c->hdr);
    return c;
}

int main(void)
{
    struct vm_env env = {0};
    env.base = event_base_new();
    env.metrics = metrics_new();
    struct vm_upstream_cfg up = {0};
    up.name = "hv1";
    up.pool.coalesce = 1;
    int mup = metrics_upstream(env.metrics, "hv1");
    struct vm_cache *k = cache_new(&env, &up, 1, NULL, mup);
    CHECK(k != NULL);

    /* The first of three identical calls leads; the others park; a different one leads too. */
    struct answer a = {0}, b = {0}, c = {0}, d = {0};
    struct vm_call *ca = client_call(&a, VM_PROC_CONNECT_LIST_ALL_DOMAINS, 10, 0);
    struct vm_call *lead = cache_call(k, ca);
    CHECK(lead && lead != ca && ca->parked);
    CHECK(evbuffer_get_length(ca->pkt) == 0); /* the packet moved to the shared call */
    struct vm_call *cb = client_call(&b, VM_PROC_CONNECT_LIST_ALL_DOMAINS, 11, 0);
    CHECK(cache_call(k, cb) == NULL && cb->parked);
    struct vm_call *cc = client_call(&c, VM_PROC_CONNECT_LIST_ALL_DOMAINS, 12, 0);
    CHECK(cache_call(k, cc) == NULL);
    struct vm_call *cd = client_call(&d, VM_PROC_CONNECT_LIST_ALL_DOMAINS, 13, 1);
    struct vm_call *lead2 = cache_call(k, cd);
    CHECK(lead2 && lead2 != lead);
    CHECK(cache_inflight(k) == 2);

    /* c's client leaves: its parked record is swallowed, and freed by the shared call. */
    call_swallow(cc);
    struct evbuffer *reply = evbuffer_new();
    uint8_t payload[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    wire_put_packet(reply, VM_PROG_REMOTE, VM_PROC_CONNECT_LIST_ALL_DOMAINS, VM_REPLY, 999,
                    VM_STATUS_OK, payload, sizeof(payload));
    call_finish(lead, reply);
    CHECK(a.calls == 1 && b.calls == 1 && c.calls == 0 && d.calls == 0);
    CHECK(a.len == VM_HDR_LEN + sizeof(payload) && b.len == a.len && a.errors == 0);
    CHECK(cache_inflight(k) == 1);

    /* Errors are shared; after an invalidation a new identical call does not join. */
    struct answer e = {0}, f = {0};
    struct vm_call *ce = client_call(&e, VM_PROC_CONNECT_LIST_ALL_DOMAINS, 14, 1);
    CHECK(cache_call(k, ce) == NULL); /* joins lead2 */
    cache_invalidate(k, VM_CACHE_INVALIDATED_WRITE);
    struct vm_call *cf = client_call(&f, VM_PROC_CONNECT_LIST_ALL_DOMAINS, 15, 1);
    struct vm_call *lead3 = cache_call(k, cf);
    CHECK(lead3 && lead3 != lead2);
    call_fail(lead2, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, "internal error: gone");
    CHECK(d.errors == 1 && e.errors == 1 && d.code == VIR_ERR_INTERNAL_ERROR && f.calls == 0);
    call_fail(lead3, VIR_ERR_OPERATION_TIMEOUT, VIR_FROM_RPC, "operation timed out");
    CHECK(f.errors == 1 && f.code == VIR_ERR_OPERATION_TIMEOUT);

    /* Not shareable: a write and an unknown procedure go on their own. */
    struct answer g = {0};
    struct vm_call *cg = client_call(&g, VM_PROC_DOMAIN_SET_AUTOSTART, 16, 0);
    CHECK(cache_call(k, cg) == cg && !cg->parked);
    call_free(cg);
    struct vm_call *ch = client_call(&g, 99999, 17, 0);
    CHECK(cache_call(k, ch) == ch);
    call_free(ch);
    CHECK(cache_inflight(k) == 0);

    /* coalesce off and no cache: no state at all */
    up.pool.coalesce = 0;
    CHECK(cache_new(&env, &up, 1, NULL, mup) == NULL);

    cache_free(k);
    evbuffer_free(reply);
    call_cache_trim(1);
    metrics_free(env.metrics);
    event_base_free(env.base);
    return check_done();
}
