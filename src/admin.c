/*
 *   request ──> dispatch: HEAD is GET without the body
 *                 ├── GET /status   ──> ops->status (JSON)
 *                 ├── GET /healthz  ──> ops->health
 *                 ├── GET /         ──> index of the endpoints
 *                 └── anything else ──> 404 (405 for a known path, wrong method)
 *
 * Every answer goes through reply(), which sets Content-Type and Content-Length itself so a
 * HEAD answer carries the same headers as the GET one (libevent leaves Content-Length out of
 * HEAD replies) and no body.
 */
#include "admin.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#include "config.h"
#include "listener.h"
#include "log.h"
#include "util.h"

struct vm_admin {
    const struct vm_admin_ops *ops; /* not owned */
    void *owner;                    /* not owned */
    struct evhttp *http;            /* owned */
    const char *unix_path;          /* config snapshot */
};

#define TEXT_PLAIN "text/plain; charset=utf-8"

/* Answer `req` with `body` (may be NULL for none), sending only the headers to a HEAD. */
static void reply(struct evhttp_request *req, int code, const char *reason, const char *ctype,
                  struct evbuffer *body)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    char len[32];
    snprintf(len, sizeof(len), "%zu", body ? evbuffer_get_length(body) : (size_t)0);
    evhttp_remove_header(h, "Content-Type");
    evhttp_remove_header(h, "Content-Length");
    evhttp_add_header(h, "Content-Type", ctype);
    evhttp_add_header(h, "Content-Length", len);
    evhttp_add_header(h, "Cache-Control", "no-store");
    int head = evhttp_request_get_command(req) == EVHTTP_REQ_HEAD;
    evhttp_send_reply(req, code, reason, head ? NULL : body);
}

static void reply_text(struct evhttp_request *req, int code, const char *reason, const char *text)
{
    struct evbuffer *body = evbuffer_new();
    if (!body)
        abort();
    evbuffer_add_printf(body, "%s\n", text);
    reply(req, code, reason, TEXT_PLAIN, body);
    evbuffer_free(body);
}

static void reply_json(struct evhttp_request *req, int code, const char *reason, json_t *doc)
{
    char *text = json_dumps(doc, JSON_INDENT(1));
    json_decref(doc);
    if (!text)
        abort();
    struct evbuffer *body = evbuffer_new();
    if (!body)
        abort();
    evbuffer_add(body, text, strlen(text));
    evbuffer_add(body, "\n", 1);
    free(text);
    reply(req, code, reason, "application/json", body);
    evbuffer_free(body);
}

static void get_status(struct vm_admin *a, struct evhttp_request *req)
{
    reply_json(req, 200, "OK", a->ops->status(a->owner));
}

static void get_healthz(struct vm_admin *a, struct evhttp_request *req)
{
    const char *word = "ok";
    int code = a->ops->health(a->owner, &word);
    reply_text(req, code, code == 200 ? "OK" : "Service Unavailable", word);
}

static void get_index(struct vm_admin *a, struct evhttp_request *req);

/* The read-only pages: GET (and so HEAD) on an exact path. */
static const struct page {
    const char *path;
    void (*get)(struct vm_admin *a, struct evhttp_request *req);
    const char *what; /* for the index */
} pages[] = {
    {"/", get_index, "this list"},
    {"/healthz", get_healthz, "200 \"ok\" while serving (for load balancers)"},
    {"/status", get_status, "sessions, upstreams, pools and counters as JSON"},
};

static void get_index(struct vm_admin *a, struct evhttp_request *req)
{
    struct evbuffer *body = evbuffer_new();
    if (!body)
        abort();
    evbuffer_add_printf(body, "virtmux admin endpoint\n");
    for (size_t i = 0; i < sizeof(pages) / sizeof(pages[0]); i++)
        evbuffer_add_printf(body, "GET  %-28s %s\n", pages[i].path, pages[i].what);
    reply(req, 200, "OK", TEXT_PLAIN, body);
    evbuffer_free(body);
}

static void dispatch(struct evhttp_request *req, void *arg)
{
    struct vm_admin *a = arg;
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    if (!path || !*path)
        path = "/";
    for (size_t i = 0; i < sizeof(pages) / sizeof(pages[0]); i++) {
        if (strcmp(path, pages[i].path) != 0)
            continue;
        if (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD) {
            pages[i].get(a, req);
        } else {
            evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
            reply_text(req, 405, "Method Not Allowed", "method not allowed");
        }
        return;
    }
    reply_text(req, 404, "Not Found", "not found");
}

struct vm_admin *admin_new(struct event_base *base, const struct vm_config *cfg,
                           const struct vm_admin_ops *ops, void *owner)
{
    char err[256];
    evutil_socket_t fd = cfg->admin_address
                             ? listener_bind_tcp(cfg->admin_address, err, sizeof(err))
                             : listener_bind_unix(cfg->admin_unix, 0600, err, sizeof(err));
    const char *where = cfg->admin_address ? cfg->admin_address : cfg->admin_unix;
    if (fd < 0 || listen(fd, 64) < 0) {
        vm_err("admin", "cannot listen on %s: %s", where, fd < 0 ? err : strerror(errno));
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    struct vm_admin *a = vm_calloc(1, sizeof(*a));
    a->ops = ops;
    a->owner = owner;
    a->unix_path = cfg->admin_unix;
    a->http = evhttp_new(base);
    if (!a->http || !evhttp_accept_socket_with_handle(a->http, fd)) {
        vm_err("admin", "cannot serve HTTP on %s", where);
        if (a->http)
            evhttp_free(a->http);
        close(fd);
        free(a);
        return NULL;
    }
    /* Every method reaches dispatch(), so a wrong one gets our 405, not libevent's 501. */
    evhttp_set_allowed_methods(a->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE |
                                            EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
    evhttp_set_gencb(a->http, dispatch, a);
    vm_info("admin", "admin endpoint on %s (GET /status, /healthz)", where);
    return a;
}

void admin_free(struct vm_admin *a)
{
    if (!a)
        return;
    evhttp_free(a->http);
    if (a->unix_path)
        unlink(a->unix_path);
    free(a);
}
