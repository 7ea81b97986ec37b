#include "stream.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "log.h"
#include "pool.h"
#include "proc.h"
#include "upstream.h"
#include "util.h"

#define UP_HIGH (1u << 20) /* stop reading the client above this much unsent upstream output */

struct vm_stream {
    struct vm_peer *c;        /* the client: owner */
    struct vm_pool *pool;     /* not owned; kept alive by our slot or our place in its queue */
    struct vm_slot_wait wait; /* our place in the pool's max_streams queue */
    int waiting;              /* queued for a slot */
    int has_slot;             /* holds one of the pool's max_streams slots */
    struct vm_link *link;     /* owned: dedicated upstream connection */
    struct vm_hdr call;       /* the creating call */
    struct evbuffer *early;   /* owned: what the client sent before the link was READY */
    int ready;
    int reply_seen;
    int upstream_paused;      /* not reading the link: the client is slow */
    int blocking_client;      /* holding the client's reading: libvirtd is slow */
    TAILQ_ENTRY(vm_stream) entry;
};

static int nstreams;

int stream_count(void)
{
    return nstreams;
}

static void stream_free(struct vm_stream *st)
{
    TAILQ_REMOVE(&st->c->streams, st, entry);
    if (st->blocking_client)
        st->c->ops->block_reading(st->c, 0);
    if (st->link) {
        struct vm_link *l = st->link;
        st->link = NULL;
        link_detach(l);
        link_retire(l);
    }
    if (st->early)
        evbuffer_free(st->early);
    if (st->waiting)
        pool_stream_cancel(st->pool, &st->wait);
    if (st->has_slot)
        pool_stream_release(st->pool);
    st->c->ops->request_end(st->c);
    free(st);
    nstreams--;
}

static const struct vm_link_ops stream_link_ops;

static void open_link(struct vm_stream *st)
{
    const struct vm_proc_info *info = vm_proc_lookup(st->call.prog, st->call.proc);
    vm_info(st->c->tag, "stream %s serial %u: opening a dedicated upstream connection",
            info ? info->name : "?", st->call.serial);
    st->has_slot = 1;
    struct vm_link_params lp;
    pool_link_params(st->pool, &lp);
    lp.dedicated = 1;
    st->link = link_new(&lp, &stream_link_ops, st);
}

static void slot_granted(struct vm_slot_wait *w)
{
    struct vm_stream *st = (struct vm_stream *)((char *)w - offsetof(struct vm_stream, wait));
    st->waiting = 0;
    open_link(st);
}

static void slot_expired(struct vm_slot_wait *w, const char *message)
{
    struct vm_stream *st = (struct vm_stream *)((char *)w - offsetof(struct vm_stream, wait));
    st->waiting = 0;
    vm_info(st->c->tag, "stream serial %u: %s", st->call.serial, message);
    wire_put_error(st->c->ops->output(st->c), &st->call, VIR_ERR_OPERATION_TIMEOUT, VIR_FROM_RPC,
                   message);
    stream_free(st);
}

void stream_start(struct vm_peer *c, struct vm_pool *p, const struct vm_hdr *h,
                  struct evbuffer *pkt)
{
    struct vm_stream *st = vm_calloc(1, sizeof(*st));
    st->c = c;
    st->pool = p;
    st->call = *h;
    st->early = evbuffer_new();
    if (!st->early)
        abort();
    evbuffer_add_buffer(st->early, pkt);
    TAILQ_INSERT_TAIL(&c->streams, st, entry);
    nstreams++;
    /* A stream holds one of the client's max_client_requests for its whole life: it is
     * what bounds how many upstream connections one client can make the gateway open. */
    c->ops->request_begin(c);
    st->wait.granted = slot_granted;
    st->wait.expired = slot_expired;
    if (pool_stream_acquire(p, &st->wait))
        open_link(st);
    else
        st->waiting = 1;
}

static struct vm_stream *find(struct vm_peer *c, uint32_t serial, int32_t proc)
{
    struct vm_stream *st;
    TAILQ_FOREACH(st, &c->streams, entry)
        if (st->call.serial == serial && st->call.proc == proc)
            return st;
    return NULL;
}

static void check_upload_pressure(struct vm_stream *st)
{
    size_t out = link_output_length(st->link);
    if (!st->blocking_client && out > UP_HIGH) {
        st->blocking_client = 1;
        st->c->ops->block_reading(st->c, 1);
    }
}

int stream_client_packet(struct vm_peer *c, const struct vm_hdr *h, struct evbuffer *pkt)
{
    struct vm_stream *st = find(c, h->serial, h->proc);
    /* the stream's own program and version only: anything else is not relayed to libvirtd */
    if (!st || h->prog != st->call.prog || h->vers != st->call.vers)
        return -1;
    if (!st->ready) {
        /* Held until the stream's connection is READY, and bounded like an upload: past
         * UP_HIGH the client is not read until the link drains it. */
        evbuffer_add_buffer(st->early, pkt);
        if (!st->blocking_client && evbuffer_get_length(st->early) > UP_HIGH) {
            st->blocking_client = 1;
            st->c->ops->block_reading(st->c, 1);
        }
        return 0;
    }
    link_write(st->link, pkt);
    check_upload_pressure(st);
    return 0;
}

/* ---- what the dedicated link reports (its ops) ---- */

static void on_link_ready(void *owner, struct vm_link *l)
{
    struct vm_stream *st = owner;
    st->ready = 1;
    link_write(st->link, st->early);
    evbuffer_free(st->early);
    st->early = NULL;
    if (st->blocking_client && link_output_length(st->link) <= UP_HIGH) {
        st->blocking_client = 0; /* the early bytes are on their way; the link's own
                                  * watermark takes over from here */
        st->c->ops->block_reading(st->c, 0);
    }
    check_upload_pressure(st);
}

static void on_link_packet(void *owner, struct vm_link *l, const struct vm_hdr *h,
                           struct evbuffer *pkt)
{
    struct vm_stream *st = owner;
    if (h->serial != st->call.serial) {
        vm_debug(st->c->tag, "stream: stray packet serial %u dropped", h->serial);
        return;
    }
    int final = 0;
    if (h->type == VM_REPLY || h->type == VM_REPLY_WITH_FDS) {
        st->reply_seen = 1;
        final = h->status != VM_STATUS_OK; /* the stream never started */
    } else if (h->type == VM_STREAM) {
        final = h->status == VM_STATUS_OK || h->status == VM_STATUS_ERROR;
    } else if (h->type != VM_STREAM_HOLE) {
        return;
    }
    evbuffer_add_buffer(st->c->ops->output(st->c), pkt);
    if (final) {
        vm_debug(st->c->tag, "stream serial %u finished", st->call.serial);
        stream_free(st);
        return;
    }
    if (!st->upstream_paused && st->c->ops->output_full(st->c)) {
        st->upstream_paused = 1;
        link_pause_reading(st->link, 1);
    }
}

static void on_link_down(void *owner, struct vm_link *l, const void *err_payload, size_t n,
                         const char *why)
{
    struct vm_stream *st = owner;
    char msg[400];
    snprintf(msg, sizeof(msg), "internal error: virtmux lost the upstream connection of this "
             "stream: %s", why);
    struct evbuffer *out = st->c->ops->output(st->c);
    if (!st->reply_seen) {
        wire_put_error(out, &st->call, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
    } else {
        struct xbuf b;
        xb_init(&b);
        wire_error_payload(&b, VIR_ERR_INTERNAL_ERROR, VIR_FROM_RPC, msg);
        wire_put_packet(out, st->call.prog, st->call.proc, VM_STREAM, st->call.serial,
                        VM_STATUS_ERROR, b.p, b.len);
        xb_free(&b);
    }
    st->link = NULL; /* the link frees itself */
    stream_free(st);
}

static void on_link_drained(void *owner, struct vm_link *l)
{
    struct vm_stream *st = owner;
    if (st->blocking_client) {
        st->blocking_client = 0;
        st->c->ops->block_reading(st->c, 0);
    }
}

static const struct vm_link_ops stream_link_ops = {
    .ready = on_link_ready,
    .packet = on_link_packet,
    .drained = on_link_drained,
    .down = on_link_down,
};

void stream_peer_drained(struct vm_peer *c)
{
    struct vm_stream *st;
    TAILQ_FOREACH(st, &c->streams, entry) {
        if (st->upstream_paused && st->link) {
            st->upstream_paused = 0;
            link_pause_reading(st->link, 0);
        }
    }
}

void stream_peer_gone(struct vm_peer *c)
{
    struct vm_stream *st;
    while ((st = TAILQ_FIRST(&c->streams)))
        stream_free(st);
}
