#include "fake_libvirtd.h"

#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "proc.h"
#include "wire.h"

#define MAX_CONNS 64
#define MAX_REGS 64

struct fconn {
    struct fake_libvirtd *f;
    struct bufferevent *bev; /* NULL once closed */
};

struct freg {
    struct fconn *c;
    uint32_t prog;
    int32_t reg_proc;
    int32_t id;
};

struct fake_libvirtd {
    struct evconnlistener *lis;
    struct fconn conns[MAX_CONNS];
    int nconns; /* slots used, open or not */
    struct freg regs[MAX_REGS];
    int nregs;
    int32_t next_id;
    unsigned fail_every, ncalls;
    unsigned answered;   /* ordinary calls */
    uint8_t *payload;    /* owned: what ordinary calls get back */
    size_t npayload;
};

static void conn_close(struct fconn *c)
{
    if (!c->bev)
        return;
    bufferevent_free(c->bev);
    c->bev = NULL;
    struct fake_libvirtd *f = c->f;
    for (int i = 0; i < f->nregs;) {
        if (f->regs[i].c == c)
            f->regs[i] = f->regs[--f->nregs];
        else
            i++;
    }
}

static struct fconn *open_conn(struct fake_libvirtd *f, unsigned pick)
{
    int open = 0;
    for (int i = 0; i < f->nconns; i++)
        open += f->conns[i].bev != NULL;
    if (!open)
        return NULL;
    pick %= (unsigned)open;
    for (int i = 0; i < f->nconns; i++)
        if (f->conns[i].bev && pick-- == 0)
            return &f->conns[i];
    return NULL;
}

static void reply(struct fconn *c, const struct vm_hdr *h, uint32_t status, const void *p,
                  size_t n)
{
    wire_put_packet(bufferevent_get_output(c->bev), h->prog, h->proc, VM_REPLY, h->serial, status,
                    p, n);
}

static void reply_u32s(struct fconn *c, const struct vm_hdr *h, const uint32_t *v, int n)
{
    struct xbuf b;
    xb_init(&b);
    for (int i = 0; i < n; i++)
        xb_u32(&b, v[i]);
    reply(c, h, VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

static void reply_error(struct fconn *c, const struct vm_hdr *h, const char *msg)
{
    struct xbuf b;
    xb_init(&b);
    wire_error_payload(&b, VIR_ERR_OPERATION_FAILED, VIR_FROM_REMOTE, msg);
    reply(c, h, VM_STATUS_ERROR, b.p, b.len);
    xb_free(&b);
}

static void on_register(struct fconn *c, const struct vm_hdr *h)
{
    struct fake_libvirtd *f = c->f;
    if (f->nregs == MAX_REGS) {
        reply_error(c, h, "fake libvirtd: too many registrations");
        return;
    }
    int32_t id = f->next_id++;
    f->regs[f->nregs++] = (struct freg){c, h->prog, h->proc, id};
    uint32_t v = (uint32_t)id;
    reply_u32s(c, h, &v, 1);
}

static void on_deregister(struct fconn *c, const struct vm_hdr *h, struct evbuffer *pkt)
{
    struct fake_libvirtd *f = c->f;
    uint8_t w[4] = {0};
    struct evbuffer_ptr pos;
    evbuffer_ptr_set(pkt, &pos, VM_HDR_LEN, EVBUFFER_PTR_SET);
    evbuffer_copyout_from(pkt, &pos, w, sizeof(w));
    int32_t id = (int32_t)((uint32_t)w[0] << 24 | (uint32_t)w[1] << 16 | (uint32_t)w[2] << 8 | w[3]);
    for (int i = 0; i < f->nregs; i++) {
        if (f->regs[i].c == c && f->regs[i].id == id) {
            f->regs[i] = f->regs[--f->nregs];
            reply(c, h, VM_STATUS_OK, NULL, 0);
            return;
        }
    }
    reply_error(c, h, "fake libvirtd: callback not registered");
}

static void on_call(struct fconn *c, const struct vm_hdr *h, struct evbuffer *pkt)
{
    const struct vm_proc_info *info = vm_proc_lookup(h->prog, h->proc);
    if (h->prog == VM_PROG_REMOTE) {
        switch (h->proc) {
        case VM_PROC_AUTH_LIST: {
            uint32_t v[2] = {1, 0}; /* [REMOTE_AUTH_NONE] */
            reply_u32s(c, h, v, 2);
            return;
        }
        case VM_PROC_CONNECT_SUPPORTS_FEATURE: {
            uint32_t v = 1;
            reply_u32s(c, h, &v, 1);
            return;
        }
        case VM_PROC_CONNECT_OPEN:
        case VM_PROC_CONNECT_CLOSE:
            reply(c, h, VM_STATUS_OK, NULL, 0);
            return;
        default:
            break;
        }
    }
    if (info && info->kind == VM_PK_EVENT_REGISTER) {
        on_register(c, h);
        return;
    }
    if (info && info->kind == VM_PK_EVENT_DEREGISTER) {
        on_deregister(c, h, pkt);
        return;
    }
    c->f->answered++;
    if (c->f->fail_every && ++c->f->ncalls % c->f->fail_every == 0) {
        reply_error(c, h, "fake libvirtd: this call fails");
        return;
    }
    reply(c, h, VM_STATUS_OK, c->f->payload, c->f->npayload);
}

/* A stream packet of the client: its end (OK, no data) is answered by our end. */
static void on_stream(struct fconn *c, const struct vm_hdr *h)
{
    if (h->type == VM_STREAM && h->status == VM_STATUS_OK)
        wire_put_packet(bufferevent_get_output(c->bev), h->prog, h->proc, VM_STREAM, h->serial,
                        VM_STATUS_OK, NULL, 0);
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    struct fconn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    for (;;) {
        uint32_t len;
        int r = wire_frame_ready(in, &len);
        if (r < 0)
            abort(); /* the gateway only forwards whole, legal frames */
        if (r == 0)
            return;
        struct evbuffer *pkt = evbuffer_new();
        if (!pkt)
            abort();
        evbuffer_remove_buffer(in, pkt, len);
        struct vm_hdr h;
        wire_hdr_peek(pkt, &h);
        if (h.prog == VM_PROG_KEEPALIVE) {
            if (h.proc == VM_PROC_KEEPALIVE_PING)
                wire_put_keepalive(bufferevent_get_output(c->bev), VM_PROC_KEEPALIVE_PONG);
        } else if (h.type == VM_CALL) {
            on_call(c, &h, pkt);
        } else if (h.type == VM_STREAM || h.type == VM_STREAM_HOLE) {
            on_stream(c, &h);
        }
        evbuffer_free(pkt);
    }
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        conn_close(arg);
}

static void accept_cb(struct evconnlistener *lis, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    struct fake_libvirtd *f = arg;
    struct fconn *c = NULL;
    for (int i = 0; i < f->nconns && !c; i++)
        if (!f->conns[i].bev)
            c = &f->conns[i];
    if (!c && f->nconns < MAX_CONNS)
        c = &f->conns[f->nconns++];
    if (!c) {
        close(fd);
        return;
    }
    c->f = f;
    c->bev = bufferevent_socket_new(evconnlistener_get_base(lis), fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev)
        abort();
    bufferevent_setcb(c->bev, read_cb, NULL, event_cb, c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

struct fake_libvirtd *fake_libvirtd_new(struct event_base *base, const char *path)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sun.sun_path))
        return NULL;
    strcpy(sun.sun_path, path);
    unlink(path);
    struct fake_libvirtd *f = calloc(1, sizeof(*f));
    if (!f)
        abort();
    f->next_id = 1;
    f->lis = evconnlistener_new_bind(base, accept_cb, f, LEV_OPT_CLOSE_ON_FREE, 64,
                                     (struct sockaddr *)&sun, sizeof(sun));
    if (!f->lis) {
        free(f);
        return NULL;
    }
    return f;
}

void fake_libvirtd_drop_all(struct fake_libvirtd *f)
{
    for (int i = 0; i < f->nconns; i++)
        conn_close(&f->conns[i]);
    f->nconns = 0;
    f->nregs = 0;
}

void fake_libvirtd_free(struct fake_libvirtd *f)
{
    if (!f)
        return;
    fake_libvirtd_drop_all(f);
    evconnlistener_free(f->lis);
    free(f->payload);
    free(f);
}

unsigned fake_libvirtd_calls(const struct fake_libvirtd *f)
{
    return f->answered;
}

void fake_libvirtd_reply_bytes(struct fake_libvirtd *f, size_t n)
{
    free(f->payload);
    f->payload = calloc(1, n ? n : 1);
    if (!f->payload)
        abort();
    f->npayload = n;
}

int fake_libvirtd_nconns(const struct fake_libvirtd *f)
{
    int n = 0;
    for (int i = 0; i < f->nconns; i++)
        n += f->conns[i].bev != NULL;
    return n;
}

void fake_libvirtd_fail_every(struct fake_libvirtd *f, unsigned every)
{
    f->fail_every = every;
    f->ncalls = 0;
}

void fake_libvirtd_event(struct fake_libvirtd *f, unsigned pick, unsigned which,
                         const uint8_t *extra, size_t n)
{
    if (!f->nregs)
        return;
    struct freg *r = &f->regs[pick % (unsigned)f->nregs];
    size_t nev = 0;
    for (size_t i = 0; i < vm_proc_table_len; i++)
        nev += vm_proc_table[i].prog == r->prog && vm_proc_table[i].kind == VM_PK_EVENT &&
               vm_proc_table[i].cb_first;
    if (!nev)
        return;
    which %= (unsigned)nev;
    const struct vm_proc_info *ev = NULL;
    for (size_t i = 0; i < vm_proc_table_len && !ev; i++)
        if (vm_proc_table[i].prog == r->prog && vm_proc_table[i].kind == VM_PK_EVENT &&
            vm_proc_table[i].cb_first && which-- == 0)
            ev = &vm_proc_table[i];
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, r->id);
    xb_bytes(&b, extra, n);
    wire_put_packet(bufferevent_get_output(r->c->bev), r->prog, ev->proc, VM_MESSAGE, 0,
                    VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

void fake_libvirtd_raw(struct fake_libvirtd *f, unsigned pick, const uint8_t *data, size_t n)
{
    struct fconn *c = open_conn(f, pick);
    if (c)
        bufferevent_write(c->bev, data, n);
}

void fake_libvirtd_drop(struct fake_libvirtd *f, unsigned pick)
{
    struct fconn *c = open_conn(f, pick);
    if (c)
        conn_close(c);
}
