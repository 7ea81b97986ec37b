/* loadgen: a closed-loop libvirt RPC load generator for benchmarks and smoke tests.
 *
 *   main ─> open C sockets ─> per socket: AUTH_LIST → CONNECT_OPEN → [DOMAIN_LOOKUP_BY_NAME]
 *                                            │ (one call at a time, checked)
 *                                            ▼
 *           RUN: keep DEPTH calls in flight; each checked reply sends the next call
 *                                            │
 *           warm-up ─> measured window (calls, latencies, CPU of --pid processes) ─> drain
 *                                            │
 *           CONNECT_CLOSE per socket ─> one JSON object on stdout
 *
 * One thread, one epoll set, level-triggered; a call costs one memcpy into the socket's
 * output buffer, and replies are parsed in place in the input buffer, so the client stays
 * cheap compared with what it measures. Every reply is checked: known serial, REPLY type,
 * status OK, and a payload that decodes completely and makes sense for the procedure.
 * Anything else is an error; a reply that cannot belong to the socket ends that socket.
 *
 * Exit status: 0 when calls > 0 and errors == 0, 1 otherwise, 2 for bad options. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"
#include "wire.h"

/* Procedure numbers from data/procedures.tsv that proc.h does not name. */
enum {
    PROC_DOMAIN_GET_INFO = 16,
    PROC_DOMAIN_LOOKUP_BY_NAME = 23,
    PROC_CONNECT_LIST_ALL_DOMAINS = 273,
    PROC_CONNECT_GET_ALL_DOMAIN_STATS = 344,
};

enum load_kind { LOAD_GETINFO, LOAD_LISTALL, LOAD_ALLSTATS };

/* Per-socket protocol state. The setup states send one call and wait for its reply. */
enum conn_state { C_AUTH, C_OPEN, C_LOOKUP, C_RUN, C_CLOSING, C_DEAD };

/* Global phase, decided by the clock (and by --calls). */
enum phase { PH_SETUP, PH_WARMUP, PH_MEASURE, PH_DRAIN, PH_CLOSE, PH_DONE };

#define MAX_PIDS 17 /* 16 from --pid, plus loadgen itself */
#define READ_CHUNK 65536
#define SETUP_TIMEOUT_NS (15ull * 1000000000ull)
#define DRAIN_TIMEOUT_NS (5ull * 1000000000ull)
#define CLOSE_TIMEOUT_NS (2ull * 1000000000ull)

struct slot {
    uint32_t serial;
    bool used;
    uint64_t sent_ns;
};

struct buf {
    uint8_t *p;
    size_t off, len, cap; /* bytes [off, len) are pending */
};

struct conn {
    int fd;
    int idx;
    enum conn_state st;
    struct buf in, out;
    bool want_out;      /* EPOLLOUT registered */
    uint32_t next_serial;
    uint32_t wait_serial; /* setup / close call outstanding */
    struct slot *slots;   /* DEPTH entries while running */
    int inflight;
    uint8_t *call;        /* the run-phase call packet, serial patched per call */
    size_t call_len;
};

struct pid_watch {
    char name[64];
    int pid;
    double cpu0, cpu1;
    bool ok;
};

static struct {
    /* options */
    const char *tcp, *unix_path, *name, *domain;
    int nconn, depth;
    double seconds, warmup;
    long long max_calls;
    enum load_kind kind;
    struct pid_watch pids[MAX_PIDS];
    int npids;
    /* run state */
    int ep;
    struct conn *conns;
    int alive;          /* connections not DEAD */
    int running;        /* connections in RUN */
    enum phase ph;
    uint64_t t_setup_done, t_measure, t_end;
    long long calls, errors, setup_errors, calls_total;
    char first_error[256];
    uint32_t *lat;      /* µs, one per measured call */
    size_t nlat, caplat;
    uint32_t lat_max;
} G;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(2);
    }
    return q;
}

/* Count an error; the first one's text is kept for the report. */
static void VM_PRINTF(2, 3) note_error(struct conn *c, const char *fmt, ...)
{
    G.errors++;
    if (c && c->st < C_RUN)
        G.setup_errors++;
    if (G.first_error[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(G.first_error, sizeof(G.first_error), "conn %d: ", c ? c->idx : -1);
    vsnprintf(G.first_error + n, sizeof(G.first_error) - (size_t)n, fmt, ap);
    va_end(ap);
}

/* ---- buffers ---- */

static void buf_reserve(struct buf *b, size_t n)
{
    if (b->off && b->len + n > b->cap) { /* compact first */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
}

/* ---- packets ---- */

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* A whole CALL packet (serial 0) with `args` as payload, malloc'd into *out. */
static size_t make_call(uint32_t prog, int proc, uint32_t type, const struct xbuf *args,
                        uint8_t **out)
{
    size_t n = VM_HDR_LEN + (args ? args->len : 0);
    struct vm_hdr h = {.len = (uint32_t)n, .prog = prog, .vers = VM_PROG_VERSION, .proc = proc,
                       .type = type, .serial = 0, .status = VM_STATUS_OK};
    *out = xrealloc(NULL, n);
    wire_hdr_encode(&h, *out);
    if (args && args->len)
        memcpy(*out + VM_HDR_LEN, args->p, args->len);
    return n;
}

/* Queue a packet (serial patched into the copy) on c's output. */
static void send_packet(struct conn *c, const uint8_t *pkt, size_t n, uint32_t serial)
{
    buf_reserve(&c->out, n);
    uint8_t *dst = c->out.p + c->out.len;
    memcpy(dst, pkt, n);
    put_be32(dst + 20, serial);
    c->out.len += n;
}

static void send_setup_call(struct conn *c, int proc, const struct xbuf *args)
{
    uint8_t *pkt;
    size_t n = make_call(VM_PROG_REMOTE, proc, VM_CALL, args, &pkt);
    c->wait_serial = c->next_serial++;
    send_packet(c, pkt, n, c->wait_serial);
    free(pkt);
}

static void send_run_call(struct conn *c, struct slot *s, uint64_t t)
{
    s->serial = c->next_serial++;
    s->used = true;
    s->sent_ns = t;
    c->inflight++;
    send_packet(c, c->call, c->call_len, s->serial);
}

/* ---- reply checks: 0 when the payload is complete and plausible ---- */

static uint64_t xr_u64(struct xrd *r)
{
    uint64_t hi = xr_u32(r);
    return hi << 32 | xr_u32(r);
}

static void xr_skip(struct xrd *r, size_t n)
{
    if (r->err || r->len - r->off < n)
        r->err = 1;
    else
        r->off += n;
}

/* remote_nonnull_domain: name, uuid[16], id. */
static void xr_domain(struct xrd *r)
{
    xr_skip_string(r);
    xr_skip(r, 16);
    (void)xr_i32(r);
}

static int check_getinfo(const uint8_t *p, size_t n)
{
    struct xrd r;
    xr_init(&r, p, n);
    uint32_t state = xr_u32(&r);
    uint64_t max_mem = xr_u64(&r);
    uint64_t mem = xr_u64(&r);
    uint32_t vcpus = xr_u32(&r);
    (void)xr_u64(&r); /* cpuTime */
    if (r.err || r.off != n)
        return -1;
    /* virDomainState ends at PMSUSPENDED (7); nrVirtCpu is an unsigned short */
    if (state > 7 || vcpus < 1 || vcpus > 65535 || mem > max_mem || max_mem == 0)
        return -1;
    return 0;
}

static int check_listall(const uint8_t *p, size_t n)
{
    struct xrd r;
    xr_init(&r, p, n);
    uint32_t count = xr_u32(&r);
    if (r.err || count < 1 || count > 16384)
        return -1;
    for (uint32_t i = 0; i < count && !r.err; i++)
        xr_domain(&r);
    uint32_t ret = xr_u32(&r);
    return r.err || r.off != n || ret != count ? -1 : 0;
}

/* remote_typed_param: field, then a union on the type (virTypedParameterType 1..7). */
static void xr_typed_param(struct xrd *r)
{
    xr_skip_string(r);
    switch (xr_u32(r)) {
    case 1: case 2: case 6: xr_skip(r, 4); break;
    case 3: case 4: case 5: xr_skip(r, 8); break;
    case 7: xr_skip_string(r); break;
    default: r->err = 1;
    }
}

static int check_allstats(const uint8_t *p, size_t n)
{
    struct xrd r;
    xr_init(&r, p, n);
    uint32_t records = xr_u32(&r);
    if (r.err || records < 1 || records > 16384)
        return -1;
    for (uint32_t i = 0; i < records && !r.err; i++) {
        xr_domain(&r);
        uint32_t nparams = xr_u32(&r);
        if (nparams > 262144)
            return -1;
        for (uint32_t k = 0; k < nparams && !r.err; k++)
            xr_typed_param(&r);
    }
    return r.err || r.off != n ? -1 : 0;
}

static int check_run_reply(const uint8_t *p, size_t n)
{
    switch (G.kind) {
    case LOAD_GETINFO: return check_getinfo(p, n);
    case LOAD_LISTALL: return check_listall(p, n);
    case LOAD_ALLSTATS: return check_allstats(p, n);
    }
    return -1;
}

/* ---- connection life ---- */

static void conn_kill(struct conn *c)
{
    if (c->st == C_DEAD)
        return;
    if (c->st == C_RUN)
        G.running--;
    c->st = C_DEAD;
    G.alive--;
    epoll_ctl(G.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

/* Fatal for this socket: counted as an error, the socket is closed. */
static void VM_PRINTF(2, 3) conn_fail(struct conn *c, const char *fmt, ...)
{
    char msg[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    note_error(c, "%s", msg);
    conn_kill(c);
}

static void fill_pipeline(struct conn *c, uint64_t t)
{
    if (G.ph != PH_WARMUP && G.ph != PH_MEASURE)
        return;
    for (int i = 0; i < G.depth && c->inflight < G.depth; i++)
        if (!c->slots[i].used)
            send_run_call(c, &c->slots[i], t);
}

static void start_running(struct conn *c, const uint8_t *dom, size_t domlen)
{
    struct xbuf args;
    xb_init(&args);
    int proc;
    switch (G.kind) {
    case LOAD_GETINFO:
        proc = PROC_DOMAIN_GET_INFO;
        xb_bytes(&args, dom, domlen);
        break;
    case LOAD_LISTALL:
        proc = PROC_CONNECT_LIST_ALL_DOMAINS;
        xb_i32(&args, 1); /* need_results */
        xb_u32(&args, 0); /* flags */
        break;
    default:
        proc = PROC_CONNECT_GET_ALL_DOMAIN_STATS;
        xb_u32(&args, 0); /* no domain list: all domains */
        xb_u32(&args, 0); /* stats: everything the driver has */
        xb_u32(&args, 0); /* flags */
        break;
    }
    c->call_len = make_call(VM_PROG_REMOTE, proc, VM_CALL, &args, &c->call);
    xb_free(&args);
    c->slots = xrealloc(NULL, sizeof(*c->slots) * (size_t)G.depth);
    memset(c->slots, 0, sizeof(*c->slots) * (size_t)G.depth);
    c->st = C_RUN;
    G.running++;
}

static void send_open(struct conn *c)
{
    struct xbuf args;
    xb_init(&args);
    xb_opt_string(&args, G.name);
    xb_u32(&args, 0);
    send_setup_call(c, VM_PROC_CONNECT_OPEN, &args);
    xb_free(&args);
    c->st = C_OPEN;
}

static void send_lookup(struct conn *c)
{
    struct xbuf args;
    xb_init(&args);
    xb_string(&args, G.domain);
    send_setup_call(c, PROC_DOMAIN_LOOKUP_BY_NAME, &args);
    xb_free(&args);
    c->st = C_LOOKUP;
}

/* AUTH_LIST must offer NONE (0): loadgen does not authenticate. */
static int auth_none_offered(const uint8_t *p, size_t n)
{
    struct xrd r;
    xr_init(&r, p, n);
    uint32_t count = xr_u32(&r);
    int none = 0;
    for (uint32_t i = 0; i < count && !r.err; i++)
        if (xr_u32(&r) == 0)
            none = 1;
    return !r.err && r.off == n && (none || count == 0);
}

/* The lookup's reply must name the domain asked for; its bytes become the GET_INFO args. */
static int lookup_ok(const uint8_t *p, size_t n)
{
    struct xrd r;
    xr_init(&r, p, n);
    char *name = xr_string(&r, VM_STRING_MAX);
    xr_skip(&r, 16);
    (void)xr_i32(&r);
    int ok = !r.err && r.off == n && name && strcmp(name, G.domain) == 0;
    free(name);
    return ok;
}

static void error_text(const uint8_t *p, size_t n, char *buf, size_t len)
{
    int code, domain;
    char msg[160];
    if (wire_error_decode(p, n, &code, &domain, msg, sizeof(msg)) < 0)
        snprintf(buf, len, "undecodable error payload");
    else
        snprintf(buf, len, "error %d/%d: %s", code, domain, msg);
}

static void on_setup_reply(struct conn *c, const struct vm_hdr *h, const uint8_t *p, size_t n)
{
    static const char *const what[] = {"AUTH_LIST", "CONNECT_OPEN", "DOMAIN_LOOKUP_BY_NAME"};
    if (h->serial != c->wait_serial || h->type != VM_REPLY) {
        conn_fail(c, "%s: unexpected packet type %u serial %u", what[c->st], h->type, h->serial);
        return;
    }
    if (h->status != VM_STATUS_OK) {
        char msg[200];
        error_text(p, n, msg, sizeof(msg));
        conn_fail(c, "%s failed: %s", what[c->st], msg);
        return;
    }
    switch (c->st) {
    case C_AUTH:
        if (!auth_none_offered(p, n))
            conn_fail(c, "AUTH_LIST: auth type NONE not offered");
        else
            send_open(c);
        break;
    case C_OPEN:
        if (n != 0)
            conn_fail(c, "CONNECT_OPEN: %zu unexpected payload bytes", n);
        else if (G.kind == LOAD_GETINFO)
            send_lookup(c);
        else
            start_running(c, NULL, 0);
        break;
    case C_LOOKUP:
        if (!lookup_ok(p, n))
            conn_fail(c, "DOMAIN_LOOKUP_BY_NAME: reply is not domain '%s'", G.domain);
        else
            start_running(c, p, n);
        break;
    default:
        break;
    }
}

static void record_latency(uint64_t ns)
{
    uint64_t us64 = ns / 1000;
    uint32_t us = us64 > UINT32_MAX ? UINT32_MAX : (uint32_t)us64;
    if (G.nlat == G.caplat) {
        G.caplat = G.caplat ? G.caplat * 2 : 65536;
        G.lat = xrealloc(G.lat, G.caplat * sizeof(*G.lat));
    }
    G.lat[G.nlat++] = us;
    if (us > G.lat_max)
        G.lat_max = us;
}

static void end_measure(uint64_t t);

static void on_run_reply(struct conn *c, const struct vm_hdr *h, const uint8_t *p, size_t n,
                         uint64_t t)
{
    struct slot *s = NULL;
    for (int i = 0; i < G.depth; i++)
        if (c->slots[i].used && c->slots[i].serial == h->serial) {
            s = &c->slots[i];
            break;
        }
    if (!s || h->type != VM_REPLY) {
        conn_fail(c, "reply type %u serial %u matches no call in flight", h->type, h->serial);
        return;
    }
    s->used = false;
    c->inflight--;
    G.calls_total++;
    if (h->status != VM_STATUS_OK) {
        char msg[200];
        error_text(p, n, msg, sizeof(msg));
        note_error(c, "call serial %u: %s", h->serial, msg);
    } else if (check_run_reply(p, n) < 0) {
        note_error(c, "call serial %u: implausible %zu-byte reply", h->serial, n);
    } else if (G.ph == PH_MEASURE) {
        G.calls++;
        record_latency(t - s->sent_ns);
        if (G.max_calls && G.calls >= G.max_calls)
            end_measure(t);
    }
    fill_pipeline(c, t);
}

static void on_packet(struct conn *c, const uint8_t *pkt, uint64_t t)
{
    struct vm_hdr h;
    wire_hdr_decode(pkt, &h);
    const uint8_t *p = pkt + VM_HDR_LEN;
    size_t n = h.len - VM_HDR_LEN;
    if (h.prog == VM_PROG_KEEPALIVE) {
        if (h.type == VM_MESSAGE && h.proc == VM_PROC_KEEPALIVE_PING) {
            uint8_t *pong;
            size_t pn = make_call(VM_PROG_KEEPALIVE, VM_PROC_KEEPALIVE_PONG, VM_MESSAGE, NULL,
                                  &pong);
            send_packet(c, pong, pn, 0);
            free(pong);
        }
        return;
    }
    if (h.prog != VM_PROG_REMOTE || h.vers != VM_PROG_VERSION) {
        conn_fail(c, "packet of program %#x version %u", h.prog, h.vers);
        return;
    }
    if (h.type == VM_MESSAGE)
        return; /* an event: not ours to judge */
    switch (c->st) {
    case C_RUN:
        on_run_reply(c, &h, p, n, t);
        break;
    case C_CLOSING:
        if (h.serial == c->wait_serial && h.type == VM_REPLY && h.status == VM_STATUS_OK)
            conn_kill(c);
        else if (h.serial != c->wait_serial)
            conn_fail(c, "stray reply serial %u while closing", h.serial);
        else
            conn_fail(c, "CONNECT_CLOSE refused");
        break;
    case C_DEAD:
        break;
    default:
        on_setup_reply(c, &h, p, n);
    }
}

/* ---- socket I/O ---- */

static void update_events(struct conn *c)
{
    bool want = c->out.len > c->out.off;
    if (c->st == C_DEAD || want == c->want_out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0u), .data.ptr = c};
    if (epoll_ctl(G.ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = want;
}

static void flush_out(struct conn *c)
{
    while (c->st != C_DEAD && c->out.len > c->out.off) {
        ssize_t w = write(c->fd, c->out.p + c->out.off, c->out.len - c->out.off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        if (w < 0) {
            conn_fail(c, "write: %s", strerror(errno));
            return;
        }
        c->out.off += (size_t)w;
    }
    if (c->out.off == c->out.len)
        c->out.off = c->out.len = 0;
    update_events(c);
}

static void read_in(struct conn *c)
{
    buf_reserve(&c->in, READ_CHUNK);
    ssize_t r = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (r <= 0) {
        if (c->st == C_CLOSING && r == 0)
            conn_kill(c); /* the peer hung up after (or instead of) the CLOSE reply */
        else
            conn_fail(c, "%s", r == 0 ? "connection closed by peer" : strerror(errno));
        return;
    }
    c->in.len += (size_t)r;
    uint64_t t = now_ns();
    while (c->st != C_DEAD && c->in.len - c->in.off >= 4) {
        const uint8_t *p = c->in.p + c->in.off;
        uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        if (!wire_len_ok(len)) {
            conn_fail(c, "illegal length word %u", len);
            return;
        }
        if (c->in.len - c->in.off < len) {
            buf_reserve(&c->in, len);
            break;
        }
        c->in.off += len;
        on_packet(c, p, t);
    }
    if (c->in.off == c->in.len)
        c->in.off = c->in.len = 0;
}

static int parse_tcp(const char *spec, char *host, size_t hlen, char *port, size_t plen)
{
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec || !colon[1])
        return -1;
    const char *h = spec;
    size_t n = (size_t)(colon - spec);
    if (h[0] == '[' && n >= 2 && h[n - 1] == ']') { /* [v6]:port */
        h++;
        n -= 2;
    }
    if (n >= hlen || strlen(colon + 1) >= plen)
        return -1;
    memcpy(host, h, n);
    host[n] = '\0';
    strcpy(port, colon + 1);
    return 0;
}

/* A connected, non-blocking socket, or -1 (message on stderr). */
static int dial(void)
{
    int fd = -1;
    if (G.unix_path) {
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        if (strlen(G.unix_path) >= sizeof(sun.sun_path)) {
            fprintf(stderr, "loadgen: unix path too long\n");
            return -1;
        }
        strcpy(sun.sun_path, G.unix_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
            fprintf(stderr, "loadgen: connect %s: %s\n", G.unix_path, strerror(errno));
            if (fd >= 0)
                close(fd);
            return -1;
        }
    } else {
        char host[256], port[32];
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
        if (parse_tcp(G.tcp, host, sizeof(host), port, sizeof(port)) < 0 ||
            getaddrinfo(host, port, &hints, &res) != 0 || !res) {
            fprintf(stderr, "loadgen: cannot resolve %s\n", G.tcp);
            return -1;
        }
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
            if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
                break;
            if (fd >= 0)
                close(fd);
            fd = -1;
        }
        freeaddrinfo(res);
        if (fd < 0) {
            fprintf(stderr, "loadgen: connect %s: %s\n", G.tcp, strerror(errno));
            return -1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* ---- CPU of watched processes ---- */

/* utime+stime of a process in seconds, or -1 if it cannot be read. */
static double proc_cpu(int pid)
{
    char path[64], data[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(data, 1, sizeof(data) - 1, f);
    fclose(f);
    data[n] = '\0';
    char *rp = strrchr(data, ')'); /* the command name may hold blanks */
    unsigned long ut, st;
    /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (!rp || sscanf(rp + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut,
                      &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void sample_cpu(int second)
{
    for (int i = 0; i < G.npids; i++) {
        double v = proc_cpu(G.pids[i].pid);
        if (v < 0)
            G.pids[i].ok = false;
        if (second)
            G.pids[i].cpu1 = v;
        else
            G.pids[i].cpu0 = v;
    }
}

/* ---- phases ---- */

static void begin_measure(uint64_t t)
{
    G.ph = PH_MEASURE;
    G.t_measure = t;
    sample_cpu(0);
}

static void end_measure(uint64_t t)
{
    if (G.ph != PH_MEASURE) /* ended before it began: an empty window */
        begin_measure(t);
    sample_cpu(1);
    G.t_end = t;
    G.ph = PH_DRAIN;
}

static void send_close(struct conn *c)
{
    send_setup_call(c, VM_PROC_CONNECT_CLOSE, NULL);
    c->st = C_CLOSING;
    G.running--;
}

/* Advance the phase by the clock; returns the epoll timeout in ms until the next deadline. */
static int tick(uint64_t t)
{
    static uint64_t phase_start;
    uint64_t deadline = 0;
    if (G.ph == PH_SETUP && phase_start == 0)
        phase_start = t;
    if (G.ph == PH_SETUP) {
        if (G.running == G.alive) {
            G.t_setup_done = t;
            G.ph = PH_WARMUP;
            phase_start = t;
            for (int i = 0; i < G.nconn; i++) /* every socket starts its loop at once */
                if (G.conns[i].st == C_RUN) {
                    fill_pipeline(&G.conns[i], t);
                    flush_out(&G.conns[i]);
                }
        } else if (t - phase_start > SETUP_TIMEOUT_NS) {
            for (int i = 0; i < G.nconn; i++)
                if (G.conns[i].st != C_DEAD && G.conns[i].st != C_RUN)
                    conn_fail(&G.conns[i], "setup timed out");
            return 0;
        } else {
            deadline = phase_start + SETUP_TIMEOUT_NS;
        }
    }
    if (G.ph == PH_WARMUP) {
        uint64_t end = phase_start + (uint64_t)(G.warmup * 1e9);
        if (t >= end)
            begin_measure(t);
        else
            deadline = end;
    }
    if (G.ph == PH_MEASURE) {
        uint64_t end = G.t_measure + (uint64_t)(G.seconds * 1e9);
        if (t >= end || G.running == 0)
            end_measure(t);
        else
            deadline = end;
    }
    if (G.ph == PH_DRAIN) {
        int busy = 0;
        for (int i = 0; i < G.nconn; i++)
            busy += G.conns[i].st == C_RUN && G.conns[i].inflight > 0;
        if (busy == 0 || t - G.t_end > DRAIN_TIMEOUT_NS) {
            for (int i = 0; i < G.nconn; i++) {
                struct conn *c = &G.conns[i];
                if (c->st == C_RUN && c->inflight > 0)
                    conn_fail(c, "%d call(s) unanswered %.0f s after the window", c->inflight,
                              DRAIN_TIMEOUT_NS / 1e9);
                else if (c->st == C_RUN) {
                    send_close(c);
                    flush_out(c);
                }
            }
            G.ph = PH_CLOSE;
            phase_start = t;
        } else {
            deadline = G.t_end + DRAIN_TIMEOUT_NS;
        }
    }
    if (G.ph == PH_CLOSE) {
        if (G.alive == 0) {
            G.ph = PH_DONE;
            return 0;
        }
        if (t - phase_start > CLOSE_TIMEOUT_NS) {
            for (int i = 0; i < G.nconn; i++)
                conn_kill(&G.conns[i]); /* no answer to CONNECT_CLOSE: not the load's fault */
            G.ph = PH_DONE;
            return 0;
        }
        deadline = phase_start + CLOSE_TIMEOUT_NS;
    }
    if (!deadline || deadline <= t)
        return 1;
    uint64_t ms = (deadline - t + 999999) / 1000000;
    return ms > 1000 ? 1000 : (int)ms;
}

static void loop(void)
{
    struct epoll_event evs[256];
    int timeout = tick(now_ns());
    while (G.ph != PH_DONE) {
        if (G.alive == 0 && G.ph < PH_DRAIN)
            end_measure(now_ns());
        int n = epoll_wait(G.ep, evs, 256, timeout);
        if (n < 0 && errno != EINTR) {
            perror("loadgen: epoll_wait");
            exit(2);
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->st == C_DEAD)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                read_in(c);
            flush_out(c);
        }
        timeout = tick(now_ns());
    }
}

/* ---- report ---- */

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of the sorted latencies (0 when there are none). */
static uint32_t pct(double q)
{
    if (!G.nlat)
        return 0;
    size_t k = (size_t)(q / 100.0 * (double)G.nlat + 0.999999);
    k = k ? k - 1 : 0;
    return G.lat[k < G.nlat ? k : G.nlat - 1];
}

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static const char *kind_name(enum load_kind k)
{
    return k == LOAD_GETINFO ? "getinfo" : k == LOAD_LISTALL ? "listall" : "allstats";
}

static void report(void)
{
    qsort(G.lat, G.nlat, sizeof(*G.lat), cmp_u32);
    double window = G.t_end > G.t_measure ? (double)(G.t_end - G.t_measure) / 1e9 : 0;
    printf("{\"proc\": \"%s\", \"connections\": %d, \"depth\": %d, \"window_s\": %.3f, "
           "\"calls\": %lld, \"calls_per_s\": %.1f, \"p50_us\": %u, \"p99_us\": %u, "
           "\"max_us\": %u, \"errors\": %lld, \"setup_errors\": %lld, \"calls_total\": %lld, "
           "\"first_error\": ",
           kind_name(G.kind), G.nconn, G.depth, window, G.calls,
           window > 0 ? (double)G.calls / window : 0.0, pct(50), pct(99), G.lat_max, G.errors,
           G.setup_errors, G.calls_total);
    if (G.first_error[0])
        json_string(G.first_error);
    else
        printf("null");
    printf(", \"cpu\": {");
    for (int i = 0; i < G.npids; i++) {
        struct pid_watch *w = &G.pids[i];
        printf("%s", i ? ", " : "");
        json_string(w->name);
        if (!w->ok) {
            printf(": null");
            continue;
        }
        double s = w->cpu1 - w->cpu0;
        printf(": {\"pid\": %d, \"seconds\": %.3f, \"us_per_call\": ", w->pid, s);
        if (G.calls)
            printf("%.2f}", s * 1e6 / (double)G.calls);
        else
            printf("null}");
    }
    printf("}}\n");
    fflush(stdout);
}

/* ---- options ---- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen (--uri-tcp HOST:PORT | --unix PATH) [options]\n"
            "  --name NAME        CONNECT_OPEN name (default test:///default)\n"
            "  -c N               connections (default 1)\n"
            "  -d DEPTH           calls in flight per connection (default 1)\n"
            "  -t SECONDS         measured window (default 5)\n"
            "  --warmup SECONDS   load before the window (default 1)\n"
            "  -n CALLS           end the window after CALLS checked replies (-t still bounds it)\n"
            "  --proc KIND        getinfo | listall | allstats (default getinfo)\n"
            "  --domain NAME      domain for getinfo (default test)\n"
            "  --pid NAME=PID     CPU of PID over the window, reported as NAME (repeatable;\n"
            "                     \"loadgen\" itself is always reported)\n"
            "Prints one JSON object; exit 0 only if calls > 0 and errors == 0.\n");
}

static double num_arg(const char *opt, const char *s, double lo, double hi)
{
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end || v < lo || v > hi) {
        fprintf(stderr, "loadgen: bad value for %s: '%s'\n", opt, s);
        exit(2);
    }
    return v;
}

static void add_pid(const char *spec)
{
    const char *eq = strchr(spec, '=');
    if (G.npids == MAX_PIDS || !eq || eq == spec || (size_t)(eq - spec) >= sizeof(G.pids[0].name)) {
        fprintf(stderr, "loadgen: bad --pid '%s' (NAME=PID, at most %d)\n", spec, MAX_PIDS - 1);
        exit(2);
    }
    struct pid_watch *w = &G.pids[G.npids++];
    memcpy(w->name, spec, (size_t)(eq - spec));
    w->name[eq - spec] = '\0';
    w->pid = (int)num_arg("--pid", eq + 1, 1, 4194304);
    w->ok = true;
}

static void parse_args(int argc, char **argv)
{
    enum { O_TCP = 256, O_UNIX, O_NAME, O_WARMUP, O_PROC, O_DOMAIN, O_PID };
    static const struct option opts[] = {
        {"uri-tcp", required_argument, NULL, O_TCP}, {"unix", required_argument, NULL, O_UNIX},
        {"name", required_argument, NULL, O_NAME},   {"warmup", required_argument, NULL, O_WARMUP},
        {"proc", required_argument, NULL, O_PROC},   {"domain", required_argument, NULL, O_DOMAIN},
        {"pid", required_argument, NULL, O_PID},     {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    G.name = "test:///default";
    G.domain = "test";
    G.nconn = 1;
    G.depth = 1;
    G.seconds = 5;
    G.warmup = 1;
    int o;
    while ((o = getopt_long(argc, argv, "c:d:t:n:h", opts, NULL)) != -1) {
        switch (o) {
        case O_TCP: G.tcp = optarg; break;
        case O_UNIX: G.unix_path = optarg; break;
        case O_NAME: G.name = optarg; break;
        case O_DOMAIN: G.domain = optarg; break;
        case O_WARMUP: G.warmup = num_arg("--warmup", optarg, 0, 3600); break;
        case O_PID: add_pid(optarg); break;
        case 'c': G.nconn = (int)num_arg("-c", optarg, 1, 100000); break;
        case 'd': G.depth = (int)num_arg("-d", optarg, 1, 4096); break;
        case 't': G.seconds = num_arg("-t", optarg, 0.001, 86400); break;
        case 'n': G.max_calls = (long long)num_arg("-n", optarg, 1, 1e15); break;
        case O_PROC:
            if (!strcmp(optarg, "getinfo"))
                G.kind = LOAD_GETINFO;
            else if (!strcmp(optarg, "listall"))
                G.kind = LOAD_LISTALL;
            else if (!strcmp(optarg, "allstats"))
                G.kind = LOAD_ALLSTATS;
            else {
                fprintf(stderr, "loadgen: --proc takes getinfo, listall or allstats\n");
                exit(2);
            }
            break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind != argc || !G.tcp == !G.unix_path) {
        usage(stderr);
        exit(2);
    }
}

int main(int argc, char **argv)
{
    char self[32];
    snprintf(self, sizeof(self), "loadgen=%d", (int)getpid());
    add_pid(self); /* the generator's own cost, always reported */
    parse_args(argc, argv);
    G.ep = epoll_create1(EPOLL_CLOEXEC);
    if (G.ep < 0) {
        perror("loadgen: epoll_create1");
        return 2;
    }
    G.conns = xrealloc(NULL, sizeof(*G.conns) * (size_t)G.nconn);
    memset(G.conns, 0, sizeof(*G.conns) * (size_t)G.nconn);
    for (int i = 0; i < G.nconn; i++) {
        struct conn *c = &G.conns[i];
        c->idx = i;
        c->fd = dial();
        if (c->fd < 0) {
            note_error(c, "cannot connect to %s", G.tcp ? G.tcp : G.unix_path);
            c->st = C_DEAD;
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(G.ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
            perror("loadgen: epoll_ctl");
            return 2;
        }
        G.alive++;
        c->st = C_AUTH;
        send_setup_call(c, VM_PROC_AUTH_LIST, NULL);
        flush_out(c);
    }
    loop();
    report();
    return G.calls > 0 && G.errors == 0 ? 0 : 1;
}
