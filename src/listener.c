#include "listener.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/queue.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/listener.h>

#include "config.h"
#include "identity.h"
#include "log.h"
#include "proxyproto.h"
#include "tls.h"
#include "util.h"

struct pending;

struct vm_listener {
    struct event_base *base;           /* not owned */
    const struct vm_listener_ops *ops;
    void *owner;                       /* not owned */
    int header_timeout_ms;             /* proxy_protocol: for the whole header */
    LIST_HEAD(, pending) pending;      /* owned: sockets still sending their PROXY header */
    const struct vm_listener_cfg *cfg; /* not owned (config snapshot) */
    SSL_CTX *tls;                      /* owned reference; sessions hold their own */
    struct evconnlistener *ev;         /* owned; closes the socket */
    char tag[160];
};

/* A TCP client's printable peer ("[::1]:5", "127.0.0.1:5") and identity address. */
static void set_tcp_peer(struct vm_identity *id, char *peer, size_t plen,
                         const struct sockaddr *sa, socklen_t salen)
{
    char host[64], serv[NI_MAXSERV];
    if (getnameinfo(sa, salen, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
        snprintf(peer, plen, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
        snprintf(id->source, sizeof(id->source), "%s", host);
    }
    memset(&id->addr, 0, sizeof(id->addr));
    memcpy(&id->addr, sa, (size_t)salen < sizeof(id->addr) ? (size_t)salen : sizeof(id->addr));
}

/* ---- PROXY protocol v2: a socket whose header is still coming ---- */

struct pending {
    struct vm_listener *l;        /* the owner: frees us when it goes */
    evutil_socket_t fd;           /* owned until handed over */
    struct event *rd, *timer;     /* owned */
    char peer[128];               /* the balancer, as the socket says */
    int held;                     /* holds an unauthenticated slot (ops->hold) */
    struct vm_identity id;
    size_t have, need;
    uint8_t buf[VM_PROXY_MAX_LEN];
    LIST_ENTRY(pending) entry;
};

/* Frees `p`; closes its socket unless it was handed over (fd = -1). */
static void pending_free(struct pending *p)
{
    LIST_REMOVE(p, entry);
    if (p->rd)
        event_free(p->rd);
    if (p->timer)
        event_free(p->timer);
    if (p->held)
        p->l->ops->release(p->l->owner);
    if (p->fd >= 0)
        close(p->fd);
    free(p);
}

static void pending_fail(struct pending *p, const char *why)
{
    vm_warn(p->l->tag, "closed %s: %s", p->peer, why);
    p->l->ops->header_refused(p->l->owner);
    pending_free(p);
}

/* The whole header is in: the client is the address it names (a LOCAL header, or one
 * without an INET address, leaves the socket's own peer). */
static void pending_done(struct pending *p, const struct vm_proxy_hdr *h)
{
    struct vm_listener *l = p->l;
    char peer[128];
    struct vm_identity id = p->id;
    snprintf(peer, sizeof(peer), "%s", p->peer);
    if (h->has_addr) {
        set_tcp_peer(&id, peer, sizeof(peer), (const struct sockaddr *)&h->src,
                     h->src.ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                                 : sizeof(struct sockaddr_in6));
        vm_debug(l->tag, "%s: PROXY header says the client is %s", p->peer, peer);
    } else {
        vm_debug(l->tag, "%s: PROXY header (%s): the socket's peer stands", p->peer,
                 h->local ? "LOCAL" : "no address");
    }
    evutil_socket_t fd = p->fd;
    p->fd = -1;
    pending_free(p);
    l->ops->accept(l->owner, l->cfg, fd, peer, &id, l->tls);
}

/* Read what the socket has of the header. Returns 1 when `p` is gone (handed over, or
 * closed), 0 while more is to come. */
static int pending_pump(struct pending *p)
{
    for (;;) {
        /* Exactly what the parser asked for, never more: what follows is the session's. */
        ssize_t n = recv(p->fd, p->buf + p->have, p->need - p->have, 0);
        if (n == 0 && p->have == 0) {
            /* A TCP health check (connect, close): worth a line, not a warning. */
            vm_info(p->l->tag, "closed %s: it sent nothing", p->peer);
            pending_free(p);
            return 1;
        }
        if (n == 0) {
            pending_fail(p, "connection closed before a complete PROXY protocol header");
            return 1;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            pending_fail(p, strerror(errno));
            return 1;
        }
        p->have += (size_t)n;
        struct vm_proxy_hdr h;
        const char *why = NULL;
        switch (proxyproto_parse(p->buf, p->have, &h, &p->need, &why)) {
        case 1:
            pending_done(p, &h);
            return 1;
        case 0:
            continue; /* p->need grew: the rest may be there already */
        default:
            pending_fail(p, why);
            return 1;
        }
    }
}

static void pending_read(evutil_socket_t fd, short what, void *arg)
{
    pending_pump(arg);
}

static void pending_timeout(evutil_socket_t fd, short what, void *arg)
{
    pending_fail(arg, "no complete PROXY protocol header in time");
}

static void pending_start(struct vm_listener *l, evutil_socket_t fd, const char *peer,
                          const struct vm_identity *id)
{
    struct pending *p = vm_calloc(1, sizeof(*p));
    p->l = l;
    p->fd = fd;
    p->id = *id;
    p->need = VM_PROXY_FIXED_LEN;
    snprintf(p->peer, sizeof(p->peer), "%s", peer);
    LIST_INSERT_HEAD(&l->pending, p, entry);
    /* A balancer usually sends the header with the connection: often it is there already. */
    if (pending_pump(p))
        return;
    /* Waiting for a header is time before authentication: it takes one of those slots. */
    if (l->ops->hold(l->owner) != VM_UNAUTH_OK) {
        vm_warn(l->tag, "refused %s: too many unauthenticated clients", peer);
        pending_free(p);
        return;
    }
    p->held = 1;
    p->rd = event_new(l->base, fd, EV_READ | EV_PERSIST, pending_read, p);
    p->timer = evtimer_new(l->base, pending_timeout, p);
    struct timeval tv = {l->header_timeout_ms / 1000, (l->header_timeout_ms % 1000) * 1000};
    if (!p->rd || !p->timer || event_add(p->rd, NULL) < 0 || evtimer_add(p->timer, &tv) < 0)
        abort();
    vm_debug(l->tag, "%s: waiting for its PROXY protocol header", peer);
}

static void accept_cb(struct evconnlistener *ev, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    struct vm_listener *l = arg;
    char peer[128] = "unix";
    struct vm_identity id;
    memset(&id, 0, sizeof(id));
    id.listener = l->cfg->name;
    int is_tcp = sa->sa_family == AF_INET || sa->sa_family == AF_INET6;
    if (is_tcp) {
        set_tcp_peer(&id, peer, sizeof(peer), sa, (socklen_t)salen);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    } else {
        struct ucred cred;
        socklen_t len = sizeof(cred);
        id.is_unix = 1;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
            id.has_cred = 1;
            id.uid = cred.uid;
            id.gid = cred.gid;
            id.pid = cred.pid;
            snprintf(peer, sizeof(peer), "unix:uid=%u,pid=%d", (unsigned)cred.uid, (int)cred.pid);
        }
    }
    if (l->cfg->proxy_protocol)
        pending_start(l, fd, peer, &id);
    else
        l->ops->accept(l->owner, l->cfg, fd, peer, &id, l->tls);
}

static void resume_accept(evutil_socket_t fd, short what, void *arg)
{
    evconnlistener_enable(arg);
}

static void error_cb(struct evconnlistener *ev, void *arg)
{
    struct vm_listener *l = arg;
    int err = EVUTIL_SOCKET_ERROR();
    vm_warn(l->tag, "accept failed: %s", evutil_socket_error_to_string(err));
    /* EMFILE and friends: pause briefly rather than spin. */
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        evconnlistener_disable(ev);
        struct timeval tv = {0, 100000};
        event_base_once(l->base, -1, EV_TIMEOUT, resume_accept, ev, &tv);
    }
}

evutil_socket_t listener_bind_tcp(const char *address, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(address, ':');
    size_t hlen = (size_t)(colon - address);
    if (hlen >= sizeof(host)) {
        snprintf(err, errlen, "address too long");
        return -1;
    }
    memcpy(host, address, hlen);
    host[hlen] = '\0';
    char *h = host;
    if (h[0] == '[' && hlen > 2 && h[hlen - 1] == ']') {
        h[hlen - 1] = '\0';
        h++;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res;
    int rc = getaddrinfo(*h && strcmp(h, "*") ? h : NULL, colon + 1, &hints, &res);
    if (rc) {
        snprintf(err, errlen, "%s", gai_strerror(rc));
        return -1;
    }
    evutil_socket_t fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        freeaddrinfo(res);
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0) {
        snprintf(err, errlen, "bind: %s", strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

evutil_socket_t listener_bind_unix(const char *path, unsigned mode, char *err, size_t errlen)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        /* A socket left by an earlier run is removed; one that still answers belongs to a
         * running process (another virtmux, libvirtd): never take it over. */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int live = probe >= 0 && connect(probe, (struct sockaddr *)&sun, sizeof(sun)) == 0;
        if (probe >= 0)
            close(probe);
        if (live) {
            snprintf(err, errlen, "another process is listening on it (a second virtmux?)");
            return -1;
        }
        unlink(path);
    }
    evutil_socket_t fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        snprintf(err, errlen, "bind: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (chmod(path, mode) < 0) {
        snprintf(err, errlen, "chmod %o: %s", mode, strerror(errno));
        close(fd);
        unlink(path);
        return -1;
    }
    return fd;
}

struct vm_listener *listener_new(struct event_base *base, const struct vm_listener_cfg *cfg,
                                 const struct vm_listener_ops *ops, void *owner,
                                 int header_timeout_ms)
{
    struct vm_listener *l = vm_calloc(1, sizeof(*l));
    l->base = base;
    l->ops = ops;
    l->owner = owner;
    l->header_timeout_ms = header_timeout_ms;
    LIST_INIT(&l->pending);
    l->cfg = cfg;
    snprintf(l->tag, sizeof(l->tag), "L:%s", cfg->name);
    char err[256];
    if (cfg->tls) {
        l->tls = tls_server_ctx(cfg->tls, err, sizeof(err));
        if (!l->tls) {
            vm_err(l->tag, "TLS: %s", err);
            free(l);
            return NULL;
        }
    }
    evutil_socket_t fd = cfg->address ? listener_bind_tcp(cfg->address, err, sizeof(err))
                                      : listener_bind_unix(cfg->unix_path, cfg->mode, err, sizeof(err));
    if (fd < 0) {
        vm_err(l->tag, "cannot listen on %s: %s", cfg->address ? cfg->address : cfg->unix_path, err);
        if (l->tls)
            tls_ctx_free(l->tls);
        free(l);
        return NULL;
    }
    l->ev = evconnlistener_new(base, accept_cb, l,
                               LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 1024, fd);
    if (!l->ev) {
        vm_err(l->tag, "cannot listen: %s", strerror(errno));
        close(fd);
        free(l);
        return NULL;
    }
    evconnlistener_set_error_cb(l->ev, error_cb);
    static const char *const auths[] = {"none", "sasl", "tls", "tls+sasl", "peer"};
    vm_info(l->tag, "listening on %s (%s%sauth %s%s%s%s)",
            cfg->address ? cfg->address : cfg->unix_path,
            cfg->proxy_protocol ? "PROXY protocol v2, " : "", cfg->tls ? "TLS, " : "",
            auths[cfg->auth], cfg->readonly ? ", read-only" : "",
            cfg->upstream ? ", upstream " : "", cfg->upstream ? cfg->upstream : "");
    return l;
}

int listener_reload_tls(struct vm_listener *l)
{
    if (!l->cfg->tls)
        return 0;
    char err[256];
    SSL_CTX *ctx = tls_server_ctx(l->cfg->tls, err, sizeof(err));
    if (!ctx) {
        vm_err(l->tag, "TLS reload failed, keeping the old certificates: %s", err);
        return -1;
    }
    tls_ctx_free(l->tls);
    l->tls = ctx;
    vm_info(l->tag, "TLS certificates reloaded");
    return 0;
}

void listener_free(struct vm_listener *l)
{
    while (!LIST_EMPTY(&l->pending))
        pending_free(LIST_FIRST(&l->pending));
    evconnlistener_free(l->ev);
    if (l->tls)
        tls_ctx_free(l->tls);
    if (l->cfg->unix_path)
        unlink(l->cfg->unix_path);
    free(l);
}

void listener_set_cfg(struct vm_listener *l, const struct vm_listener_cfg *cfg)
{
    l->cfg = cfg;
}

void listener_set_enabled(struct vm_listener *l, int on)
{
    if (on)
        evconnlistener_enable(l->ev);
    else
        evconnlistener_disable(l->ev);
}
