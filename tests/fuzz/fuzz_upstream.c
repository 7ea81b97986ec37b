/* Fuzz an upstream link (upstream.c) with what "libvirtd" sends it.
 *
 *   pool_submit(k calls) --> pool --> link --connect--> stub libvirtd (unix socket, same loop)
 *                                       ^                     | writes: handshake replies
 *                                       `---------------------'  (optional) + the fuzz bytes
 *
 * A real pool of a real gateway grows one link to a unix socket the harness listens on; the
 * stub answers nothing by itself, it writes the input: libvirtd's replies to the handshake
 * (AUTH_LIST serial 0, SUPPORTS_FEATURE serial 1, CONNECT_OPEN serial 2) when the mode byte
 * asks for them, then the fuzzed bytes: replies to the calls in flight (serials 3...),
 * keepalive, events, stream packets, garbage. The loop runs until quiet, the gateway is
 * freed and the loop base with it.
 *
 * Input: byte 0 = mode
 *   bits 0-1  handshake replies written before the fuzz bytes: 0 none, 1 AUTH_LIST,
 *             2 + SUPPORTS_FEATURE, 3 + CONNECT_OPEN (the link is READY)
 *   bit 2     the stub hangs up after writing
 *   bits 3-5  calls submitted to the pool, minus one (1-8)
 *   bit 6     read-only pool
 *   bit 7     the upstream has a SASL login (upstreams[].sasl): the handshake replies are
 *             then AUTH_LIST [SASL], SASL_INIT "PLAIN", SASL_START complete, and (3) the
 *             feature and the open, so libvirtd's SASL replies get decoded too
 * then the bytes libvirtd sends.
 * Checked: every submitted call completes exactly once (reply or failure), a reply handed to
 * a call is a REPLY with that call's upstream serial and a length that matches its header,
 * and LeakSanitizer finds nothing once the gateway is gone. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "call.h"
#include "config.h"
#include "fuzz.h"
#include "gateway.h"
#include "log.h"
#include "pool.h"
#include "proc.h"
#include "util.h"
#include "wire.h"

#define MAX_CALLS 8
#define LOOP_MAX 400  /* loop turns per phase */
#define QUIET_TURNS 6 /* turns without progress that count as quiet */

static char sock_path[108];
static char pw_path[128];

struct fcall {
    struct vm_call *c; /* valid until its done callback returns */
    int done;
};

struct stub {
    const uint8_t *data; /* what to write once a link connects */
    size_t size;
    int steps;           /* handshake replies written first */
    int sasl;            /* ... for a SASL login */
    int hangup;
    int accepted;
    struct bufferevent *conn[4];
    int nconn;
    unsigned long progress; /* bumps on every callback, to detect quiet */
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    snprintf(sock_path, sizeof(sock_path), "/tmp/virtmux-fuzz-upstream-%d.sock", (int)getpid());
    snprintf(pw_path, sizeof(pw_path), "/tmp/virtmux-fuzz-upstream-%d.pw", (int)getpid());
    FILE *f = fopen(pw_path, "w");
    if (!f || fputs("secret\n", f) < 0 || fclose(f) != 0 || chmod(pw_path, 0600) != 0)
        abort(); /* a secret: the config refuses one that others may read */
    /* FUZZ_VERBOSE=1 shows the engine's debug log, to follow a reproducer. */
    vm_log_setup(getenv("FUZZ_VERBOSE") ? VM_LOG_DEBUG : VM_LOG_ERROR, 0);
    signal(SIGPIPE, SIG_IGN); /* as proxy/main.c: a peer that hung up is an EPIPE, not death */
    return 0;
}

static void call_done(void *arg, struct vm_call *c, const struct vm_hdr *h, struct evbuffer *pkt,
                      const struct vm_call_error *err)
{
    struct fcall *fc = arg;
    if (fc->done++)
        abort(); /* completed twice */
    if ((h == NULL) == (err == NULL))
        abort();
    if (h) {
        if (!pkt || h->len != evbuffer_get_length(pkt) || h->serial != fc->c->up_serial ||
            (h->type != VM_REPLY && h->type != VM_REPLY_WITH_FDS))
            abort();
    }
}

static void stub_read(struct bufferevent *bev, void *arg)
{
    struct stub *st = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    st->progress += evbuffer_get_length(in) + 1;
    evbuffer_drain(in, evbuffer_get_length(in));
}

static void stub_event(struct bufferevent *bev, short what, void *arg)
{
    struct stub *st = arg;
    st->progress++;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        for (int i = 0; i < st->nconn; i++)
            if (st->conn[i] == bev)
                st->conn[i] = NULL;
        bufferevent_free(bev);
    }
}

static void stub_written(struct bufferevent *bev, void *arg)
{
    struct stub *st = arg;
    st->progress++;
    if (!st->hangup)
        return;
    for (int i = 0; i < st->nconn; i++)
        if (st->conn[i] == bev)
            st->conn[i] = NULL;
    bufferevent_free(bev);
}

static void put_reply(struct evbuffer *out, int32_t proc, uint32_t serial, const void *p, size_t n)
{
    wire_put_packet(out, VM_PROG_REMOTE, proc, VM_REPLY, serial, VM_STATUS_OK, p, n);
}

/* libvirtd's side of a SASL login with PLAIN: serials 0-2, then the feature (3), open (4). */
static void write_sasl_handshake(struct evbuffer *out, int steps)
{
    if (steps >= 1) {
        static const uint8_t sasl[8] = {0, 0, 0, 1, 0, 0, 0, 1}; /* [REMOTE_AUTH_SASL] */
        put_reply(out, VM_PROC_AUTH_LIST, 0, sasl, sizeof(sasl));
    }
    if (steps >= 2) {
        static const uint8_t mechs[12] = {0, 0, 0, 5, 'P', 'L', 'A', 'I', 'N', 0, 0, 0};
        put_reply(out, 67, 1, mechs, sizeof(mechs)); /* AUTH_SASL_INIT */
    }
    if (steps >= 3) {
        static const uint8_t done[12] = {0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0}; /* complete, nil */
        static const uint8_t yes[4] = {0, 0, 0, 1};
        put_reply(out, 68, 2, done, sizeof(done)); /* AUTH_SASL_START */
        put_reply(out, VM_PROC_CONNECT_SUPPORTS_FEATURE, 3, yes, sizeof(yes));
        put_reply(out, VM_PROC_CONNECT_OPEN, 4, NULL, 0);
    }
}

static void write_handshake(struct evbuffer *out, int steps, int sasl)
{
    if (sasl) {
        write_sasl_handshake(out, steps);
        return;
    }
    if (steps >= 1) {
        static const uint8_t none[8] = {0, 0, 0, 1, 0, 0, 0, 0}; /* [REMOTE_AUTH_NONE] */
        put_reply(out, VM_PROC_AUTH_LIST, 0, none, sizeof(none));
    }
    if (steps >= 2) {
        static const uint8_t yes[4] = {0, 0, 0, 1};
        put_reply(out, VM_PROC_CONNECT_SUPPORTS_FEATURE, 1, yes, sizeof(yes));
    }
    if (steps >= 3)
        put_reply(out, VM_PROC_CONNECT_OPEN, 2, NULL, 0);
}

static void stub_accept(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa,
                        int salen, void *arg)
{
    struct stub *st = arg;
    st->progress++;
    if (st->nconn == (int)(sizeof(st->conn) / sizeof(st->conn[0]))) {
        close(fd);
        return;
    }
    struct bufferevent *bev = bufferevent_socket_new(evconnlistener_get_base(lev), fd,
                                                     BEV_OPT_CLOSE_ON_FREE);
    if (!bev)
        abort();
    st->conn[st->nconn++] = bev;
    bufferevent_setcb(bev, stub_read, stub_written, stub_event, st);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    /* Only the first connection gets the input; a reconnect finds a silent libvirtd. */
    if (st->accepted++ == 0) {
        write_handshake(bufferevent_get_output(bev), st->steps, st->sasl);
        bufferevent_write(bev, st->data, st->size);
    }
}

static struct evconnlistener *stub_listen(struct event_base *base, struct stub *st)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", sock_path);
    unlink(sock_path);
    struct evconnlistener *lev = evconnlistener_new_bind(
        base, stub_accept, st, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 16,
        (struct sockaddr *)&sun, sizeof(sun));
    if (!lev)
        abort();
    return lev;
}

static void run_until_quiet(struct event_base *base, struct stub *st, struct fcall *calls, int n)
{
    int quiet = 0;
    for (int turn = 0; turn < LOOP_MAX && quiet < QUIET_TURNS; turn++) {
        unsigned long before = st->progress;
        int done_before = 0;
        for (int i = 0; i < n; i++)
            done_before += calls[i].done;
        event_base_loop(base, EVLOOP_NONBLOCK);
        int done_after = 0;
        for (int i = 0; i < n; i++)
            done_after += calls[i].done;
        quiet = st->progress == before && done_after == done_before ? quiet + 1 : 0;
    }
}

static struct vm_config *make_config(int sasl)
{
    char login[256] = "";
    if (sasl)
        snprintf(login, sizeof(login),
                 ", \"sasl\": {\"username\": \"fuzz\", \"password_file\": \"%s\"}", pw_path);
    char json[1024];
    snprintf(json, sizeof(json),
             "{\"listeners\": [{\"name\": \"l\", \"unix\": \"%s.unused\"}],"
             " \"upstreams\": [{\"name\": \"hv\", \"uri\": \"test+unix:///default?socket=%s\","
             "   \"pool\": {\"max_connections\": 1, \"max_inflight\": 8}%s}],"
             " \"default_upstream\": \"hv\"}",
             sock_path, sock_path, login);
    struct vm_config *cfg = config_parse(json, stderr);
    if (!cfg)
        abort();
    return cfg;
}

static struct vm_call *make_call(struct fcall *fc, int i)
{
    struct vm_call *c = call_new(call_done, fc, 0);
    c->hdr.prog = VM_PROG_REMOTE;
    c->hdr.proc = 16 + i; /* any forwarded procedure: the link does not look */
    c->hdr.serial = 100 + (uint32_t)i;
    uint8_t args[4] = {0, 0, 0, (uint8_t)i};
    wire_put_packet(c->pkt, VM_PROG_REMOTE, c->hdr.proc, VM_CALL, 0, VM_STATUS_OK, args,
                    sizeof(args));
    fc->c = c;
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mode = data[0];
    struct stub st = {.data = data + 1, .size = size - 1, .steps = mode & 3,
                      .sasl = mode >> 7, .hangup = (mode >> 2) & 1};
    int ncalls = 1 + ((mode >> 3) & 7);
    struct fcall calls[MAX_CALLS];
    memset(calls, 0, sizeof(calls));

    struct event_base *base = event_base_new();
    if (!base)
        abort();
    struct evconnlistener *lev = stub_listen(base, &st);
    struct vm_config *cfg = make_config(st.sasl);
    struct vm_gateway *gw = gateway_new(base, cfg);
    struct vm_pool *p = gateway_pool(gw, &cfg->upstreams[0], "test:///default", (mode >> 6) & 1);
    for (int i = 0; i < ncalls; i++)
        pool_submit(p, NULL, make_call(&calls[i], i));

    run_until_quiet(base, &st, calls, ncalls);

    /* libvirtd goes away, then the gateway: whatever is still in flight fails now. */
    for (int i = 0; i < st.nconn; i++)
        if (st.conn[i])
            bufferevent_free(st.conn[i]);
    st.nconn = 0;
    run_until_quiet(base, &st, calls, ncalls);
    evconnlistener_free(lev);
    gateway_free(gw);
    event_base_free(base);
    unlink(sock_path);

    for (int i = 0; i < ncalls; i++)
        if (calls[i].done != 1)
            abort(); /* a call that never completed */
    return 0;
}
