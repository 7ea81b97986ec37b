/*
 * Fuzz whole client sessions: the bytes of up to three clients, and what libvirtd does, drive
 * the real engine (session, pool, links, events, streams, policy) in one event loop.
 *
 *   client sockets (socketpairs) --> session.c --> pool --> links --unix--> fake_libvirtd.c
 *        ^  the harness writes ops' bytes          |                    (answers like libvirtd;
 *        `-- and parses everything sent back <-----'                     events, raw bytes and
 *                                                                         hang-ups on demand)
 * Input: one config byte, then operations (see `run_op`). A fresh gateway and event base per
 * input, torn down at the end, so leaks and use-after-free across the teardown show up too.
 *
 * Checked besides memory safety: everything the gateway sends a client is a sequence of legal
 * frames (inside a SASL security layer: bytes that decode), those it sends of its own accord of
 * a libvirt program; every callback event carries a callback id the client was given and has
 * not deregistered; a client gets at most as many REPLYs for a serial as it sent CALLs with it
 * (unless libvirtd itself was made to send junk); every session is gone once its client hung
 * up; the fake libvirtd never receives an illegal frame; a SASL login of a TCP client never
 * completes without a security layer.
 */
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <netinet/in.h>
#include <sasl/sasl.h>

#include "auth.h"
#include "config.h"
#include "fake_libvirtd.h"
#include "fuzz.h"
#include "gateway.h"
#include "identity.h"
#include "log.h"
#include "proc.h"
#include "session.h"
#include "wire.h"

#define REQUIRE(c) do { if (!(c)) { fprintf(stderr, "fuzz_session: %s\n", #c); abort(); } } while (0)
#define NCLIENTS 3
#define MAX_SERIALS 512

struct serial_count {
    uint32_t serial;
    int calls, replies;
    enum vm_proc_kind kind;  /* of the last call with this serial */
    int32_t dereg_id;        /* the id a DEREGISTER call with this serial names */
};

#define MAX_IDS 64

struct client {
    int fd;                 /* our end; -1 when hung up (or never connected) */
    int reading;            /* drain what the gateway sends (0: let it pile up) */
    struct evbuffer *tx;    /* not yet written to the socket */
    struct evbuffer *sent;  /* written, parsed for the CALL serials */
    struct evbuffer *rx;    /* received, not yet parsed */
    uint32_t skip;          /* FD dummy bytes after a CALL_WITH_FDS, as the gateway skips them */
    int tx_broken;          /* sent an illegal length word: the gateway closes, stop counting */
    int32_t ids[MAX_IDS];   /* event callback ids the gateway gave this client, still live */
    int nids;
    int ids_unsure;         /* a (de)registration could not be told apart: no id checks */
    /* After a SASL login with a security layer (see op_login): */
    sasl_conn_t *sasl;      /* owned; NULL for a plain client */
    unsigned maxout;        /* largest plaintext block per sasl_encode */
    struct evbuffer *enc_tx, *enc_rx; /* encoded bytes to write / read but not yet decoded */
    uint32_t await;         /* a REPLY serial the login waits for (0: none) ... */
    uint8_t *awaited;       /* ... its payload once here (malloc'd), parsing stops there */
    size_t nawaited;
    int got_await;
    struct serial_count serials[MAX_SERIALS];
    int nserials;
};

static char sock_path[108];
static char sasldb_path[128];  /* "" when saslpasswd2 could not make one */
static struct event_base *base;
static struct vm_gateway *gw;
static struct fake_libvirtd *fake;
static struct vm_config *cfg;
static struct client clients[NCLIENTS];
static int upstream_junk;   /* libvirtd sent raw bytes: reply counts prove nothing then */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char dir[] = "/tmp/vm-fuzz-session.XXXXXX";
    REQUIRE(mkdtemp(dir));
    snprintf(sock_path, sizeof(sock_path), "%s/libvirt-sock", dir);
    signal(SIGPIPE, SIG_IGN); /* as proxy/main.c: a peer that left is an EPIPE, not a death */
    /* A sasldb with one user, for the SASL listener of the policy variant. */
    char cmd[512];
    snprintf(sasldb_path, sizeof(sasldb_path), "%s/gw.sasldb", dir);
    snprintf(cmd, sizeof(cmd), "echo fuzzpass | saslpasswd2 -f %s -a libvirt -u localhost -c "
             "-p fuzz >/dev/null 2>&1", sasldb_path);
    if (system(cmd) != 0 || access(sasldb_path, R_OK) != 0) {
        fprintf(stderr, "fuzz_session: no saslpasswd2, the SASL listener is left out\n");
        sasldb_path[0] = '\0';
    }
    REQUIRE(sasl_client_init(NULL) == SASL_OK); /* for op_login */
    vm_log_setup(getenv("FUZZ_SESSION_LOG") ? VM_LOG_DEBUG : VM_LOG_ERROR, 0);
    return 0;
}

/* cyrus-sasl's plugins allocate at init and never free it, and sasl_server_done() unloads
 * them, which leaves LeakSanitizer a stack it cannot follow or name. Keeping the plugins
 * loaded (RTLD_NODELETE) makes those leaks name their module, and tests/fuzz/lsan.supp
 * suppresses them by it; it also spares a dlopen per input. */
static int pin_one(struct dl_phdr_info *info, size_t size, void *arg)
{
    if (info->dlpi_name && strstr(info->dlpi_name, "/sasl2/"))
        dlopen(info->dlpi_name, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    return 0;
}

static void pin_sasl_plugins(void)
{
    static int done;
    if (!done)
        dl_iterate_phdr(pin_one, NULL);
    done = 1;
}

/* ---- client side ---- */

static struct serial_count *serial_slot(struct client *c, uint32_t serial)
{
    for (int i = 0; i < c->nserials; i++)
        if (c->serials[i].serial == serial)
            return &c->serials[i];
    if (c->nserials == MAX_SERIALS)
        return NULL;
    c->serials[c->nserials] = (struct serial_count){.serial = serial};
    return &c->serials[c->nserials++];
}

/* Count the CALLs in what was written, framing it exactly as the gateway does. */
static void parse_sent(struct client *c)
{
    while (!c->tx_broken) {
        if (c->skip) {
            size_t n = evbuffer_get_length(c->sent);
            size_t k = n < c->skip ? n : c->skip;
            if (!k)
                return;
            evbuffer_drain(c->sent, k);
            c->skip -= (uint32_t)k;
            continue;
        }
        uint32_t len;
        int r = wire_frame_ready(c->sent, &len);
        if (r < 0)
            c->tx_broken = 1;
        if (r <= 0)
            return;
        uint8_t raw[VM_HDR_LEN + 4] = {0};
        evbuffer_copyout(c->sent, raw, len < sizeof(raw) ? len : sizeof(raw));
        struct vm_hdr h;
        wire_hdr_decode(raw, &h);
        evbuffer_drain(c->sent, len);
        if (h.prog == VM_PROG_KEEPALIVE)
            continue;
        if (h.type == VM_CALL) {
            struct serial_count *sc = serial_slot(c, h.serial);
            if (sc) {
                const struct vm_proc_info *info = vm_proc_lookup(h.prog, h.proc);
                enum vm_proc_kind kind = info ? info->kind : VM_PK_CALL;
                /* Two calls with one serial: whose reply is whose is unknown. */
                if (sc->calls++ && (kind == VM_PK_EVENT_REGISTER || kind == VM_PK_EVENT_DEREGISTER ||
                                    sc->kind == VM_PK_EVENT_REGISTER ||
                                    sc->kind == VM_PK_EVENT_DEREGISTER))
                    c->ids_unsure = 1;
                sc->kind = kind;
                sc->dereg_id = (int32_t)((uint32_t)raw[28] << 24 | (uint32_t)raw[29] << 16 |
                                         (uint32_t)raw[30] << 8 | raw[31]);
            }
        } else if (h.type == VM_CALL_WITH_FDS && len >= VM_HDR_LEN + 4) {
            uint32_t nfds = (uint32_t)raw[28] << 24 | (uint32_t)raw[29] << 16 |
                            (uint32_t)raw[30] << 8 | raw[31];
            if (nfds <= 32) {
                c->skip = nfds;
                struct serial_count *sc = serial_slot(c, h.serial);
                if (sc)
                    sc->calls++;
            }
        }
    }
}

/* Follow the callback ids a client holds, from its REGISTER reply to its DEREGISTER reply;
 * every callback event it receives must carry one of them (the gateway rewrites libvirtd's). */
static void follow_ids(struct client *c, const struct vm_hdr *h, const uint8_t *pay, size_t n)
{
    int32_t first = n >= 4 ? (int32_t)((uint32_t)pay[0] << 24 | (uint32_t)pay[1] << 16 |
                                       (uint32_t)pay[2] << 8 | pay[3]) : 0;
    if (h->type == VM_MESSAGE) {
        const struct vm_proc_info *info = vm_proc_lookup(h->prog, h->proc);
        if (!info || info->kind != VM_PK_EVENT || !info->cb_first || c->ids_unsure)
            return;
        int known = 0;
        for (int i = 0; i < c->nids; i++)
            known |= c->ids[i] == first;
        REQUIRE(n >= 4 && known);
        return;
    }
    if (h->type != VM_REPLY || h->status != VM_STATUS_OK)
        return;
    struct serial_count *sc = serial_slot(c, h->serial);
    if (!sc)
        return;
    if (sc->kind == VM_PK_EVENT_REGISTER && n >= 4) {
        if (c->nids == MAX_IDS)
            c->ids_unsure = 1;
        else
            c->ids[c->nids++] = first;
    } else if (sc->kind == VM_PK_EVENT_DEREGISTER) {
        for (int i = 0; i < c->nids; i++)
            if (c->ids[i] == sc->dereg_id)
                c->ids[i--] = c->ids[--c->nids];
    }
}

/* Everything the gateway sends must be whole legal frames of a libvirt program. */
static void parse_received(struct client *c)
{
    for (;;) {
        uint32_t len;
        int r = wire_frame_ready(c->rx, &len);
        REQUIRE(r >= 0);
        if (r == 0)
            return;
        const uint8_t *raw = evbuffer_pullup(c->rx, len);
        struct vm_hdr h;
        wire_hdr_decode(raw, &h);
        if (c->await && h.type == VM_REPLY && h.serial == c->await) {
            /* The login's reply: whatever follows may be in the security layer already. */
            c->got_await = h.status == VM_STATUS_OK;
            c->nawaited = len - VM_HDR_LEN;
            c->awaited = malloc(c->nawaited + 1);
            REQUIRE(c->awaited);
            memcpy(c->awaited, raw + VM_HDR_LEN, c->nawaited);
            c->await = 0;
            evbuffer_drain(c->rx, len);
            return;
        }
        if (!c->tx_broken)
            follow_ids(c, &h, raw + VM_HDR_LEN, len - VM_HDR_LEN);
        evbuffer_drain(c->rx, len);
        /* A REPLY mirrors its call's header, as libvirtd's does even for an unknown program;
         * anything the gateway sends of its own accord is of a libvirt program. */
        if (h.type != VM_REPLY) {
            REQUIRE(h.vers == VM_PROG_VERSION);
            REQUIRE(h.prog == VM_PROG_REMOTE || h.prog == VM_PROG_QEMU ||
                    h.prog == VM_PROG_LXC || h.prog == VM_PROG_KEEPALIVE);
        }
        if (h.type == VM_REPLY && !upstream_junk && !c->tx_broken) {
            struct serial_count *sc = serial_slot(c, h.serial);
            if (sc) {
                sc->replies++;
                REQUIRE(sc->replies <= sc->calls);
            }
        }
    }
}

/* Inside the security layer: plaintext to send is encoded (and counts as sent) at once. */
static void encode_tx(struct client *c)
{
    size_t n;
    while ((n = evbuffer_get_length(c->tx)) > 0) {
        if (n > c->maxout)
            n = c->maxout;
        const char *out;
        unsigned outlen;
        REQUIRE(sasl_encode(c->sasl, (const char *)evbuffer_pullup(c->tx, (ev_ssize_t)n),
                            (unsigned)n, &out, &outlen) == SASL_OK);
        evbuffer_add(c->enc_tx, out, outlen);
        evbuffer_remove_buffer(c->tx, c->sent, n);
    }
}

/* What the gateway sends inside the layer must decode: it never mixes in plaintext. */
static void decode_rx(struct client *c)
{
    size_t n;
    while ((n = evbuffer_get_length(c->enc_rx)) > 0) {
        if (n > 65536)
            n = 65536;
        const char *out;
        unsigned outlen;
        REQUIRE(sasl_decode(c->sasl, (const char *)evbuffer_pullup(c->enc_rx, (ev_ssize_t)n),
                            (unsigned)n, &out, &outlen) == SASL_OK);
        evbuffer_add(c->rx, out, outlen);
        evbuffer_drain(c->enc_rx, n);
    }
}

static void client_io(struct client *c)
{
    if (c->fd < 0)
        return;
    struct evbuffer *wire_tx = c->tx;
    if (c->sasl) {
        encode_tx(c);
        wire_tx = c->enc_tx;
    }
    while (evbuffer_get_length(wire_tx)) {
        size_t n = evbuffer_get_length(wire_tx);
        if (n > 4096)
            n = 4096;
        ssize_t k = write(c->fd, evbuffer_pullup(wire_tx, (ev_ssize_t)n), n);
        if (k <= 0)
            break;
        if (c->sasl)
            evbuffer_drain(wire_tx, (size_t)k);
        else
            evbuffer_remove_buffer(c->tx, c->sent, (size_t)k);
    }
    parse_sent(c);
    while (c->reading || c->await) {
        uint8_t buf[4096];
        ssize_t k = read(c->fd, buf, sizeof(buf));
        if (k <= 0)
            break;
        evbuffer_add(c->sasl ? c->enc_rx : c->rx, buf, (size_t)k);
    }
    if (c->sasl)
        decode_rx(c);
    parse_received(c);
}

static void client_hangup(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    if (c->sasl)
        sasl_dispose(&c->sasl);
    c->sasl = NULL;
    evbuffer_drain(c->enc_tx, evbuffer_get_length(c->enc_tx));
    evbuffer_drain(c->enc_rx, evbuffer_get_length(c->enc_rx));
    free(c->awaited);
    c->awaited = NULL;
    c->await = 0;
    evbuffer_drain(c->tx, evbuffer_get_length(c->tx));
    evbuffer_drain(c->sent, evbuffer_get_length(c->sent));
    evbuffer_drain(c->rx, evbuffer_get_length(c->rx));
    c->skip = 0;
    c->tx_broken = 0;
    c->nserials = 0;
    c->nids = 0;
    c->ids_unsure = 0;
}

/* A client connects lazily, on its first operation (again after a hang-up). */
static struct client *client_get(unsigned k)
{
    struct client *c = &clients[k % NCLIENTS];
    if (c->fd >= 0)
        return c;
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    int small = 16384; /* small buffers: back-pressure is reached with little data */
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    REQUIRE(evutil_make_socket_nonblocking(sv[0]) == 0 && evutil_make_socket_nonblocking(sv[1]) == 0);
    c->fd = sv[1];
    c->reading = 1;
    const struct vm_listener_cfg *l = &cfg->listeners[k % cfg->nlisteners];
    struct vm_identity id = {.listener = l->name, .is_unix = 1, .has_cred = 1, .uid = 1000 + k % NCLIENTS};
    if (l->auth == VM_AUTH_SASL) {
        /* A TCP peer: SASL must then bring a security layer (DIGEST-MD5). */
        struct sockaddr_in *sin = (struct sockaddr_in *)&id.addr;
        sin->sin_family = AF_INET;
        sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        snprintf(id.source, sizeof(id.source), "127.0.0.1");
        id.is_unix = 0;
        id.has_cred = 0;
    }
    char peer[32];
    snprintf(peer, sizeof(peer), "fuzz-client-%u", k % NCLIENTS);
    gateway_adopt(gw, l, sv[0], peer, &id, NULL);
    return c;
}

/* ---- the loop ---- */

static void pump(int turns)
{
    for (int i = 0; i < turns; i++) {
        for (int k = 0; k < NCLIENTS; k++)
            client_io(&clients[k]);
        event_base_loop(base, EVLOOP_NONBLOCK);
    }
    for (int k = 0; k < NCLIENTS; k++)
        client_io(&clients[k]);
}

/* ---- operations ---- */

struct input {
    const uint8_t *p;
    size_t n;
};

static unsigned take(struct input *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static const uint8_t *take_bytes(struct input *in, size_t *len)
{
    size_t want = take(in);
    if (want > in->n)
        want = in->n;
    const uint8_t *p = in->p;
    in->p += want;
    in->n -= want;
    *len = want;
    return p;
}

static void put_call(struct client *c, uint32_t prog, int32_t proc, uint32_t type, uint32_t serial,
                     uint32_t status, const void *payload, size_t n)
{
    wire_put_packet(c->tx, prog, proc, type, serial, status, payload, n);
}

static const uint32_t progs[] = {VM_PROG_REMOTE, VM_PROG_QEMU, VM_PROG_LXC, VM_PROG_KEEPALIVE};

static const char *const open_names[] = {
    "", "test:///default", "test:///hv1/default", "test:///nowhere/default", "qemu:///system",
    "test:///hv1", "test+tcp://gw/hv1/default?x=1", "test:///ro/default", "test:///hv2/default",
};

/* The `which`-th procedure of the table with kind `kind` (any program). */
static const struct vm_proc_info *proc_of_kind(enum vm_proc_kind kind, unsigned which)
{
    size_t n = 0;
    for (size_t i = 0; i < vm_proc_table_len; i++)
        n += vm_proc_table[i].kind == kind;
    if (!n)
        return NULL;
    which %= (unsigned)n;
    for (size_t i = 0; i < vm_proc_table_len; i++)
        if (vm_proc_table[i].kind == kind && which-- == 0)
            return &vm_proc_table[i];
    return NULL;
}

static void op_open(struct client *c, struct input *in)
{
    unsigned sel = take(in), flags = take(in);
    struct xbuf b;
    xb_init(&b);
    if (sel & 0x80)
        xb_u32(&b, 0); /* absent name */
    else
        xb_opt_string(&b, open_names[sel % (sizeof(open_names) / sizeof(open_names[0]))]);
    xb_u32(&b, flags & 1);
    put_call(c, VM_PROG_REMOTE, VM_PROC_CONNECT_OPEN, VM_CALL, take(in), VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

static void op_call(struct client *c, struct input *in)
{
    uint32_t prog = progs[take(in) % 4];
    unsigned hi = take(in);
    int32_t proc = (int32_t)(hi << 8 | take(in));
    uint32_t serial = take(in);
    size_t n;
    const uint8_t *p = take_bytes(in, &n);
    put_call(c, prog, proc, VM_CALL, serial, VM_STATUS_OK, p, n);
}

/* An event registration of any family (callback style or legacy): the argument is the event
 * id and an absent object filter, which is what clients send for "all objects". */
static void op_register(struct client *c, struct input *in)
{
    const struct vm_proc_info *p = proc_of_kind(VM_PK_EVENT_REGISTER, take(in));
    struct xbuf b;
    xb_init(&b);
    if (p->prog == VM_PROG_QEMU) {
        xb_u32(&b, 0);               /* dom: absent */
        xb_opt_string(&b, take(in) & 1 ? "SHUTDOWN" : NULL);
        xb_u32(&b, 0);               /* flags */
    } else {
        xb_i32(&b, (int32_t)(take(in) % 24)); /* event id */
        xb_u32(&b, 0);                         /* object: absent */
    }
    put_call(c, p->prog, p->proc, VM_CALL, take(in), VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

static void op_deregister(struct client *c, struct input *in)
{
    const struct vm_proc_info *p = proc_of_kind(VM_PK_EVENT_DEREGISTER, take(in));
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, (int32_t)(take(in) % 8));
    put_call(c, p->prog, p->proc, VM_CALL, take(in), VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

/* Start a stream, or send a stream packet for serial/proc of an earlier one. */
static void op_stream(struct client *c, struct input *in)
{
    const struct vm_proc_info *p = proc_of_kind(VM_PK_STREAM_CREATE, take(in));
    unsigned what = take(in);
    uint32_t serial = take(in);
    size_t n;
    const uint8_t *data = take_bytes(in, &n);
    if (what % 4 == 0)
        put_call(c, p->prog, p->proc, VM_CALL, serial, VM_STATUS_OK, data, n);
    else if (what % 4 == 1)
        put_call(c, p->prog, p->proc, VM_STREAM, serial, VM_STATUS_CONTINUE, data, n);
    else if (what % 4 == 2)
        put_call(c, p->prog, p->proc, VM_STREAM, serial, what & 4 ? VM_STATUS_ERROR : VM_STATUS_OK,
                 NULL, 0);
    else
        put_call(c, p->prog, p->proc, VM_STREAM_HOLE, serial, VM_STATUS_CONTINUE, data, n);
}

static void op_keepalive(struct client *c, struct input *in)
{
    unsigned what = take(in);
    if (what & 1) {
        put_call(c, VM_PROG_KEEPALIVE, what & 2 ? VM_PROC_KEEPALIVE_PONG : VM_PROC_KEEPALIVE_PING,
                 VM_MESSAGE, 0, VM_STATUS_OK, NULL, 0);
        return;
    }
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, (int32_t)(what >> 1) % 16); /* CONNECT_SUPPORTS_FEATURE */
    put_call(c, VM_PROG_REMOTE, VM_PROC_CONNECT_SUPPORTS_FEATURE, VM_CALL, take(in), VM_STATUS_OK,
             b.p, b.len);
    xb_free(&b);
}

/* AUTH_SASL_INIT, START (mechanism + token) or STEP (token); the token is `int nil; char
 * data<>` with four wire bytes per char. */
static void op_sasl(struct client *c, struct input *in)
{
    static const char *const mechs[] = {"SCRAM-SHA-256", "DIGEST-MD5", "GSSAPI", "PLAIN", ""};
    unsigned what = take(in);
    uint32_t serial = take(in);
    size_t n;
    const uint8_t *data = take_bytes(in, &n);
    struct xbuf b;
    xb_init(&b);
    int32_t proc = 67 + (int32_t)(what % 3);
    if (proc == 68)
        xb_string(&b, mechs[(what >> 2) % 5]);
    if (proc != 67)
        xb_nil_chars(&b, what & 0x80 ? NULL : data, (unsigned)n);
    put_call(c, VM_PROG_REMOTE, proc, VM_CALL, serial, VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

static int sasl_user(void *ctx, int id, const char **result, unsigned *len)
{
    *result = "fuzz";
    if (len)
        *len = 4;
    return SASL_OK;
}

static int sasl_pass(sasl_conn_t *conn, void *ctx, int id, sasl_secret_t **secret)
{
    static union {
        sasl_secret_t s;
        unsigned char bytes[sizeof(sasl_secret_t) + 16];
    } pw;
    pw.s.len = 8;
    memcpy(pw.s.data, "fuzzpass", 9);
    *secret = &pw.s;
    return SASL_OK;
}

static int sasl_realm(void *ctx, int id, const char **avail, const char **result)
{
    *result = avail && avail[0] ? avail[0] : "localhost";
    return SASL_OK;
}

/* Wait for the REPLY to `serial`; its payload in c->awaited. 0 when it came and was OK. */
static int await_reply(struct client *c, uint32_t serial)
{
    free(c->awaited);
    c->awaited = NULL;
    c->got_await = 0;
    c->await = serial;
    for (int i = 0; i < 64 && c->await && c->fd >= 0; i++)
        pump(1);
    c->await = 0;
    return c->awaited && c->got_await ? 0 : -1;
}

static void send_sasl(struct client *c, int32_t proc, uint32_t serial, const char *mech,
                      const char *data, unsigned len)
{
    struct xbuf b;
    xb_init(&b);
    if (mech)
        xb_string(&b, mech);
    if (proc != 67)
        xb_nil_chars(&b, data, len);
    put_call(c, VM_PROG_REMOTE, proc, VM_CALL, serial, VM_STATUS_OK, b.p, b.len);
    xb_free(&b);
}

/* A whole DIGEST-MD5 login with the sasldb's user, as libvirt's client does it, ending in the
 * security layer: from then on this client's bytes are encoded and decoded (client_io). The
 * fuzzer cannot forge the answers, so this operation does it for it. */
static void op_login(struct client *c)
{
    static const sasl_callback_t cbs[] = {
        {SASL_CB_USER, (int (*)(void))(void (*)(void))sasl_user, NULL},
        {SASL_CB_AUTHNAME, (int (*)(void))(void (*)(void))sasl_user, NULL},
        {SASL_CB_PASS, (int (*)(void))(void (*)(void))sasl_pass, NULL},
        {SASL_CB_GETREALM, (int (*)(void))(void (*)(void))sasl_realm, NULL},
        {SASL_CB_LIST_END, NULL, NULL},
    };
    if (c->sasl || !sasldb_path[0])
        return;
    sasl_conn_t *conn;
    if (sasl_client_new("libvirt", "localhost", NULL, NULL, cbs, 0, &conn) != SASL_OK)
        return;
    sasl_security_properties_t sp = {.min_ssf = 56, .max_ssf = 100000, .maxbufsize = 65536,
                                     .security_flags = SASL_SEC_NOANONYMOUS | SASL_SEC_NOPLAINTEXT};
    sasl_setprop(conn, SASL_SEC_PROPS, &sp);
    const char *out = NULL, *mech = NULL;
    unsigned outlen = 0;
    uint32_t serial = 0x7f000000u;
    send_sasl(c, 67, serial, NULL, NULL, 0);
    struct xrd r;
    char *mechs = NULL;
    if (await_reply(c, serial) == 0) {
        xr_init(&r, c->awaited, c->nawaited);
        mechs = xr_string(&r, 4096);
    }
    int rc = mechs ? sasl_client_start(conn, mechs, NULL, &out, &outlen, &mech) : SASL_FAIL;
    free(mechs);
    if (rc != SASL_OK && rc != SASL_CONTINUE)
        goto fail;
    send_sasl(c, 68, ++serial, mech, out, outlen);
    for (;;) {
        static char data[65536];
        unsigned len;
        int nil;
        if (await_reply(c, serial) < 0)
            goto fail;
        xr_init(&r, c->awaited, c->nawaited);
        int complete = xr_i32(&r);
        if (xr_nil_chars(&r, data, sizeof(data), &len, &nil) < 0)
            goto fail;
        if (!complete || !nil) {
            rc = sasl_client_step(conn, nil ? NULL : data, len, NULL, &out, &outlen);
            if (rc != SASL_OK && rc != SASL_CONTINUE)
                goto fail;
        }
        if (complete)
            break;
        send_sasl(c, 69, ++serial, NULL, out, outlen);
    }
    const void *v = NULL;
    sasl_getprop(conn, SASL_SSF, &v);
    REQUIRE(v && *(const sasl_ssf_t *)v >= 56); /* the gateway must not accept less on TCP */
    v = NULL;
    sasl_getprop(conn, SASL_MAXOUTBUF, &v);
    c->maxout = v && *(const unsigned *)v ? *(const unsigned *)v : 4096;
    c->sasl = conn;
    /* Bytes after the completing reply are in the layer already. */
    evbuffer_add_buffer(c->enc_rx, c->rx);
    client_io(c);
    return;
fail:
    sasl_dispose(&conn);
}

/* One operation: op byte = client << 4 | kind, then the kind's bytes (LEN-prefixed data takes
 * one length byte). Kinds: 0 raw bytes (LEN data), 1 call (prog, proc hi, proc lo, serial, LEN
 * args), 2 open (name, flags, serial), 3 pump (turns), 4 hang up, 5 libvirtd event (which
 * registration, which event, LEN extra), 6 libvirtd raw bytes (which link, LEN data), 7
 * libvirtd hangs up (which link), 8 toggle reading, 9 event register (which, arg, serial),
 * 10 deregister (which, id, serial), 11 stream (which, what, serial, LEN data), 12 keepalive or
 * feature (what, serial), 13 local procedure (which, serial), 14 SASL step (what, serial, LEN
 * token), 15 a whole DIGEST-MD5 login. tests/fuzz/make_seeds.py writes them by name. */
static void run_op(unsigned op, struct input *in)
{
    unsigned who = op >> 4;
    size_t n;
    const uint8_t *p;
    if (vm_log_enabled(VM_LOG_DEBUG))
        vm_debug("fuzz", "op %u client %u (%zu bytes left)", op & 15, who % NCLIENTS, in->n);
    switch (op & 15) {
    case 0:  /* raw client bytes */
        p = take_bytes(in, &n);
        evbuffer_add(client_get(who)->tx, p, n);
        break;
    case 1:
        op_call(client_get(who), in);
        break;
    case 2:
        op_open(client_get(who), in);
        break;
    case 3:
        pump(1 + take(in) % 32);
        break;
    case 4:
        client_hangup(&clients[who % NCLIENTS]);
        break;
    case 5: {
        unsigned pick = take(in), which = take(in);
        p = take_bytes(in, &n);
        fake_libvirtd_event(fake, pick, which, p, n);
        break;
    }
    case 6: {
        unsigned pick = take(in);
        p = take_bytes(in, &n);
        upstream_junk = 1;
        fake_libvirtd_raw(fake, pick, p, n);
        break;
    }
    case 7:
        fake_libvirtd_drop(fake, take(in));
        break;
    case 8:
        client_get(who)->reading ^= 1;
        break;
    case 9:
        op_register(client_get(who), in);
        break;
    case 10:
        op_deregister(client_get(who), in);
        break;
    case 11:
        op_stream(client_get(who), in);
        break;
    case 12:
        op_keepalive(client_get(who), in);
        break;
    case 13: /* CONNECT_CLOSE, GET_URI, (UN)REGISTER_CLOSE_CALLBACK, AUTH_LIST, SET_IDENTITY */
    {
        static const int32_t local[] = {VM_PROC_CONNECT_CLOSE, VM_PROC_CONNECT_GET_URI,
                                        VM_PROC_CONNECT_REGISTER_CLOSE_CALLBACK,
                                        VM_PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK,
                                        VM_PROC_AUTH_LIST, VM_PROC_CONNECT_SET_IDENTITY};
        int32_t proc = local[take(in) % 6];
        put_call(client_get(who), VM_PROG_REMOTE, proc, VM_CALL, take(in), VM_STATUS_OK, NULL, 0);
        break;
    }
    case 14:
        op_sasl(client_get(who), in);
        break;
    case 15:
        op_login(client_get(who));
        break;
    default:
        pump(1);
        break;
    }
    pump(1);
}

/* ---- one input ---- */

/* Config bits: 1 idle_timeout_s 0 and hv1 has a micro-cache (read-write too), 2 max_inflight 1, 4 max_client_requests 2, 8 the "ro"
 * listener is read-only, 16|32 libvirtd fails every 2nd/3rd/5th call, 64 one connection per
 * pool, 128 the policy variant: a SASL listener (client 2), a second upstream and rules. */
static struct vm_config *make_config(unsigned bits)
{
    char json[4096], sasl[1024] = "", policy[1024] = "", hv2[512] = "";
    int variant = bits & 128;
    if (variant && sasldb_path[0])
        snprintf(sasl, sizeof(sasl),
                 ", {\"name\": \"sasl\", \"unix\": \"/nonexistent/sasl\", \"auth\": \"sasl\"}],"
                 " \"sasl\": {\"sasldb\": \"%s\", \"mechanisms\": [\"scram-sha-256\", \"digest-md5\"],"
                 "   \"allowed_users\": [\"fuzz\"], \"max_failures\": 100000,"
                 "   \"service_host\": \"localhost\"", sasldb_path);
    if (variant) {
        snprintf(hv2, sizeof(hv2),
                 ", {\"name\": \"hv2\", \"uri\": \"test+unix:///default?socket=%s\"}", sock_path);
        snprintf(policy, sizeof(policy),
                 ", \"policy\": {\"default\": \"deny\", \"rules\": ["
                 "   {\"match\": {\"unix_uid\": 1001}, \"readonly\": true, \"upstreams\": \"*\"},"
                 "   {\"match\": {\"listener\": \"sa*\"}, \"upstreams\": [\"hv2\"], \"max_sessions\": 1},"
                 "   {\"match\": {\"unix_uid\": 1000}, \"upstreams\": [\"hv1\"], \"max_sessions\": 1}]}");
    }
    snprintf(json, sizeof(json),
             "{\"listeners\": [{\"name\": \"rw\", \"unix\": \"/nonexistent/rw\"},"
             "                 {\"name\": \"ro\", \"unix\": \"/nonexistent/ro\", \"readonly\": %s}"
             "                 %s%s,"
             " \"upstreams\": [{\"name\": \"hv1\", \"uri\": \"test+unix:///default?socket=%s\","
             "   \"pool\": {\"max_connections\": %d, \"max_inflight\": %d, \"idle_timeout_s\": %d}%s}"
             "   %s],"
             " \"default_upstream\": \"hv1\","
             " \"limits\": {\"max_client_requests\": %d},"
             " \"events\": {\"max_queue_bytes\": 65536}%s}",
             bits & 8 ? "true" : "false", sasl, sasl[0] ? "}" : "]", sock_path,
             bits & 64 ? 1 : 3, bits & 2 ? 1 : 4, bits & 1 ? 0 : 60,
             bits & 1 ? ", \"cache\": {\"ttl_ms\": 200, \"readwrite\": true, \"max_entries\": 4,"
                        " \"procedures\": [\"CONNECT_LIST_ALL_DOMAINS\", \"DOMAIN_GET_INFO\","
                        " \"CONNECT_GET_HOSTNAME\", \"DOMAIN_LOOKUP_BY_NAME\"]}"
                      : "",
             hv2, bits & 4 ? 2 : 16,
             policy);
    struct vm_config *c = config_parse(json, stderr);
    REQUIRE(c);
    return c;
}

static int open_sessions(void)
{
    json_t *st = gateway_status_json(gw);
    int n = (int)json_integer_value(json_object_get(st, "sessions"));
    json_decref(st);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 8192)
        return 0;
    struct input in = {data + 1, size - 1};
    base = event_base_new();
    REQUIRE(base);
    cfg = make_config(data[0]);
    gw = gateway_new(base, cfg);
    if (cfg->sasl) {
        REQUIRE(auth_global_init(cfg->sasl) == 0); /* what gateway_start does */
        pin_sasl_plugins();
    }
    fake = fake_libvirtd_new(base, sock_path);
    REQUIRE(fake);
    static const unsigned fail_every[] = {0, 2, 3, 5};
    fake_libvirtd_fail_every(fake, fail_every[(data[0] >> 4) & 3]);
    upstream_junk = 0;
    for (int k = 0; k < NCLIENTS; k++) {
        clients[k].fd = -1;
        clients[k].tx = evbuffer_new();
        clients[k].sent = evbuffer_new();
        clients[k].rx = evbuffer_new();
        clients[k].enc_tx = evbuffer_new();
        clients[k].enc_rx = evbuffer_new();
        REQUIRE(clients[k].tx && clients[k].sent && clients[k].rx && clients[k].enc_tx &&
                clients[k].enc_rx);
    }

    while (in.n)
        run_op(take(&in), &in);
    pump(16);

    /* Every client hangs up: every session must go, whatever state it was in. */
    for (int k = 0; k < NCLIENTS; k++) {
        clients[k].reading = 1;
        pump(2);
        client_hangup(&clients[k]);
    }
    pump(8);
    REQUIRE(open_sessions() == 0);

    fake_libvirtd_drop_all(fake);
    pump(8);
    gateway_free(gw);
    fake_libvirtd_free(fake);
    pump(2);
    for (int k = 0; k < NCLIENTS; k++) {
        evbuffer_free(clients[k].tx);
        evbuffer_free(clients[k].sent);
        evbuffer_free(clients[k].rx);
        evbuffer_free(clients[k].enc_tx);
        evbuffer_free(clients[k].enc_rx);
    }
    event_base_free(base);
    gw = NULL;
    fake = NULL;
    base = NULL;
    return 0;
}
