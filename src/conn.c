#include "conn.h"

#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "metrics.h"
#include "util.h"

/* Encoded bytes a SASL layer may queue in the socket's buffer before the plaintext waits. */
#define DEFAULT_LAYER_CAP (256u << 10)

struct vm_conn {
    struct bufferevent *bev;     /* owned: the top of the stack (socket, TLS, or filter) */
    const struct vm_conn_ops *ops;
    void *owner;                 /* not owned */
    struct event *kick;          /* owned: resumes framing from the loop */
    struct event *flush;         /* owned: writes a plain socket at the end of the turn */
    struct event *hup;           /* owned: notices a hang-up while reading is paused ... */
    evutil_socket_t hup_fd;      /* ... on this duplicate of the socket (owned) */
    struct evbuffer *pkt;        /* owned: holds one packet while its owner handles it */
    int in_packet;               /* ops->packet is running (with pkt) */
    int plain;                   /* we write the socket ourselves (see conn.h) */
    int connected;
    int flush_pending;
    size_t skip;                 /* raw bytes to drop before the next frame */
    size_t low_mark;
    int paused;
    int raw;                     /* ops->raw reads the input first */
    void (*watch)(struct evbuffer *, const struct evbuffer_cb_info *, void *);
    void *watch_arg;
    struct vm_bytes *bytes;      /* not owned: packet bytes in and out are added here */
};

static void watch_hangup(struct vm_conn *c, int on);

/* Frames at the front of the input, handled one by one until the input runs dry, the owner
 * pauses, or it closes the connection (then `c` is gone: return at once). */
static void process(struct vm_conn *c)
{
    while (!c->paused) {
        struct evbuffer *in = bufferevent_get_input(c->bev);
        if (c->raw) {
            int r = c->ops->raw(c->owner, c, in);
            if (r <= 0)
                return;
            c->raw = 0;
            continue;
        }
        if (c->skip) {
            size_t n = evbuffer_get_length(in);
            if (!n)
                return;
            size_t k = n < c->skip ? n : c->skip;
            evbuffer_drain(in, k);
            c->skip -= k;
            continue;
        }
        uint32_t len;
        int r = wire_frame_ready(in, &len);
        if (r < 0) {
            uint8_t w[4];
            evbuffer_copyout(in, w, 4);
            c->ops->bad_length(c->owner, c, w);
            return;
        }
        if (r == 0)
            return;
        /* The packet moves (no copy) into the connection's scratch buffer; the owner may move
         * it on. The buffer is not freed here: the owner may have freed the connection. */
        struct evbuffer *pkt = c->pkt;
        evbuffer_drain(pkt, evbuffer_get_length(pkt)); /* what an owner left last time */
        evbuffer_remove_buffer(in, pkt, len);
        if (c->bytes)
            c->bytes->in += len;
        struct vm_hdr h;
        wire_hdr_peek(pkt, &h);
        c->in_packet = 1;
        if (c->ops->packet(c->owner, c, &h, pkt) < 0)
            return; /* c may be gone */
        c->in_packet = 0;
    }
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    process(arg);
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
    process(arg);
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    struct vm_conn *c = arg;
    if (c->plain && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        bufferevent_disable(bev, EV_WRITE); /* finished a short write: ours again */
    if (c->ops->drained)
        c->ops->drained(c->owner, c);
}

/* Output was appended (counted); on a plain socket, write it at the end of this turn. */
static void output_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    struct vm_conn *c = arg;
    if (c->bytes)
        c->bytes->out += info->n_added;
    if (info->n_added && c->plain && !c->flush_pending) {
        c->flush_pending = 1;
        event_active(c->flush, 0, 0);
    }
}

/* The bufferevent keeps the front of its output frozen so that only it drains it; thaw it
 * for our own write. */
static int write_now(struct vm_conn *c, struct evbuffer *out)
{
    evbuffer_unfreeze(out, 1);
    int n = evbuffer_write(out, bufferevent_getfd(c->bev));
    evbuffer_freeze(out, 1);
    return n;
}

/* One writev of everything queued. What the socket does not take now is left to the
 * bufferevent (write interest, then write_cb gives the socket back to us). */
static void flush_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_conn *c = arg;
    c->flush_pending = 0;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (!c->plain || !evbuffer_get_length(out))
        return;
    if (!c->connected || write_now(c, out) < 0 || evbuffer_get_length(out)) {
        /* not yet connected, would block, or failed: the bufferevent writes (and reports
         * an error through event_cb) */
        bufferevent_enable(c->bev, EV_WRITE);
        return;
    }
    if (c->ops->drained)
        c->ops->drained(c->owner, c); /* may free c: nothing after this */
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct vm_conn *c = arg;
    if (what & BEV_EVENT_CONNECTED) {
        c->connected = 1;
        if (c->plain && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            bufferevent_disable(bev, EV_WRITE); /* ours from now on (write_cb hands it over
                                                 * otherwise, once the queue is written) */
    }
    c->ops->event(c->owner, c, what);
}

static void install(struct vm_conn *c)
{
    bufferevent_setcb(c->bev, read_cb, write_cb, event_cb, c);
    if (c->plain) {
        /* Until connected, the bufferevent's write interest is what notices the connect
         * (a unix socket may even connect at once and only signal it through it). */
        if (c->connected)
            bufferevent_disable(c->bev, EV_WRITE);
    }
    evbuffer_add_cb(bufferevent_get_output(c->bev), output_cb, c);
    bufferevent_setwatermark(c->bev, EV_WRITE, c->low_mark, 0);
    if (c->watch)
        evbuffer_add_cb(bufferevent_get_output(c->bev), c->watch, c->watch_arg);
    if (!c->paused)
        bufferevent_enable(c->bev, EV_READ);
}

struct vm_conn *conn_new(struct bufferevent *bev, const struct vm_conn_ops *ops, void *owner,
                         int flags)
{
    struct vm_conn *c = vm_calloc(1, sizeof(*c));
    c->bev = bev;
    c->ops = ops;
    c->owner = owner;
    c->plain = !!(flags & VM_CONN_PLAIN);
    c->connected = !!(flags & VM_CONN_CONNECTED);
    c->kick = event_new(bufferevent_get_base(bev), -1, 0, kick_cb, c);
    c->flush = event_new(bufferevent_get_base(bev), -1, 0, flush_cb, c);
    c->pkt = evbuffer_new();
    if (!c->kick || !c->flush || !c->pkt)
        abort();
    install(c);
    return c;
}

static void free_later(evutil_socket_t fd, short what, void *arg)
{
    evbuffer_free(arg);
}

void conn_free(struct vm_conn *c)
{
    if (!c)
        return;
    event_free(c->kick);
    event_free(c->flush);
    if (c->in_packet) {
        /* Closed while its owner handles a packet: the owner may still read the packet
         * (libvirtd's error it passes on, for one), so it goes after this loop turn. */
        struct timeval now = {0, 0};
        if (event_base_once(bufferevent_get_base(c->bev), -1, EV_TIMEOUT, free_later, c->pkt,
                            &now) < 0)
            abort();
    } else {
        evbuffer_free(c->pkt);
    }
    watch_hangup(c, 0);
    bufferevent_free(c->bev);
    free(c);
}

void conn_count_bytes(struct vm_conn *c, struct vm_bytes *bytes)
{
    c->bytes = bytes;
}

struct evbuffer *conn_output(struct vm_conn *c)
{
    return bufferevent_get_output(c->bev);
}

size_t conn_output_length(const struct vm_conn *c)
{
    return evbuffer_get_length(bufferevent_get_output(c->bev));
}

struct bufferevent *conn_bev(struct vm_conn *c)
{
    return c->bev;
}

void conn_set_low_mark(struct vm_conn *c, size_t low)
{
    c->low_mark = low;
    bufferevent_setwatermark(c->bev, EV_WRITE, low, 0);
}

void conn_watch_output(struct vm_conn *c,
                       void (*cb)(struct evbuffer *, const struct evbuffer_cb_info *, void *),
                       void *arg)
{
    c->watch = cb;
    c->watch_arg = arg;
    evbuffer_add_cb(bufferevent_get_output(c->bev), cb, arg);
}

/* Something happened on a paused connection's socket: a hang-up (FIN or reset) is reported as
 * EOF; new bytes wait for reading to resume. */
static void hup_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_conn *c = arg;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
        c->ops->event(c->owner, c, BEV_EVENT_EOF | BEV_EVENT_READING); /* may free c */
}

/* While reading is paused the bufferevent cannot see EOF: a peer that hangs up with its calls
 * stuck elsewhere would keep its session (and slots) until they return, or for ever. libvirtd's
 * poll sees POLLHUP whatever it asked for. The watch is edge-triggered, so bytes that keep
 * arriving cannot spin the loop, and a reset (reported as readable, not as EV_CLOSED) is seen
 * too. It sits on a duplicate of the socket: libevent does not mix edge- and level-triggered
 * events on one descriptor, and the bufferevent's are level-triggered. (Found by fuzz_session,
 * first with EV_CLOSED alone, which missed resets and could spin.) */
static void watch_hangup(struct vm_conn *c, int on)
{
    if (!on) {
        if (c->hup) {
            event_free(c->hup);
            close(c->hup_fd);
            c->hup = NULL;
        }
        return;
    }
    evutil_socket_t fd = bufferevent_getfd(c->bev);
    if (c->hup || fd < 0)
        return; /* no socket yet: EOF is seen when reading resumes */
    c->hup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (c->hup_fd < 0)
        return;
    c->hup = event_new(bufferevent_get_base(c->bev), c->hup_fd,
                       EV_READ | EV_CLOSED | EV_ET | EV_PERSIST, hup_cb, c);
    if (!c->hup || event_add(c->hup, NULL) < 0)
        abort();
}

void conn_pause(struct vm_conn *c, int paused)
{
    if (paused == c->paused)
        return;
    c->paused = paused;
    watch_hangup(c, paused);
    if (paused) {
        bufferevent_disable(c->bev, EV_READ);
    } else {
        bufferevent_enable(c->bev, EV_READ);
        event_active(c->kick, 0, 0); /* frames may already be buffered */
    }
}

int conn_paused(const struct vm_conn *c)
{
    return c->paused;
}

void conn_skip(struct vm_conn *c, size_t n)
{
    c->skip += n;
}

void conn_expect_raw(struct vm_conn *c)
{
    c->raw = 1;
}

int conn_push_filter(struct vm_conn *c,
                     struct bufferevent *(*wrap)(void *arg, struct bufferevent *under),
                     void *arg)
{
    struct bufferevent *f = wrap(arg, c->bev);
    if (!f)
        return -1;
    struct bufferevent *under = c->bev;
    if (c->plain) {
        /* The filter writes through the socket's bufferevent, which writes for itself from
         * now on; what we queued before (the last plain reply) goes first. */
        c->plain = 0;
        bufferevent_enable(under, EV_WRITE);
    }
    /* Back-pressure looks at the output the owner appends to: the filter's. The filter moves
     * whatever it can into the socket's buffer, so cap that buffer; beyond the cap the
     * plaintext waits in the filter, where it is counted. The watch moves up too. */
    size_t cap = c->low_mark ? c->low_mark : DEFAULT_LAYER_CAP;
    bufferevent_setwatermark(under, EV_WRITE, cap / 2, cap);
    if (c->watch)
        evbuffer_remove_cb(bufferevent_get_output(under), c->watch, c->watch_arg);
    /* Packet bytes are counted above the layer, where they are plaintext. */
    evbuffer_remove_cb(bufferevent_get_output(under), output_cb, c);
    c->bev = f; /* the filter owns the one below */
    install(c);
    return 0;
}
