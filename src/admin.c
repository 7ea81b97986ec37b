/*
 *   request ──> bearer token (admin.token_file) ── missing or wrong ──> 401
 *          └──> dispatch
 *                 ├── pages (GET; HEAD = GET without the body)
 *                 │     /          index of the endpoints
 *                 │     /healthz   ops->health
 *                 │     /metrics   ops->metrics (Prometheus text format)
 *                 │     /status    ops->status (JSON)
 *                 ├── actions (POST /NOUN/NAME/VERB)
 *                 │     /sessions/ID/disconnect   ops->disconnect_session
 *                 │     /upstreams/NAME/pause|resume|drain   ops->upstream_action
 *                 └── anything else ──> 404 (405 for a known path and the wrong method)
 *
 * Adding an action is one row in `actions` and one callback in vm_admin_ops. Every answer
 * goes through reply(), which sets Content-Type and Content-Length itself so a HEAD answer
 * carries the same headers as the GET one (libevent leaves Content-Length out of HEAD
 * replies) and no body.
 */
#include "admin.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#include "config.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "util.h"

struct vm_admin {
    const struct vm_admin_ops *ops; /* not owned */
    void *owner;                    /* not owned */
    struct evhttp *http;            /* owned */
    const char *unix_path;          /* config snapshot */
    const char *token;              /* config snapshot: required bearer token, or NULL */
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

static struct evbuffer *new_body(void)
{
    struct evbuffer *body = evbuffer_new();
    if (!body)
        abort();
    return body;
}

static void reply_text(struct evhttp_request *req, int code, const char *reason, const char *text)
{
    struct evbuffer *body = new_body();
    evbuffer_add_printf(body, "%s\n", text);
    reply(req, code, reason, TEXT_PLAIN, body);
    evbuffer_free(body);
}

/* Takes `doc`. */
static void reply_json(struct evhttp_request *req, int code, const char *reason, json_t *doc)
{
    char *text = json_dumps(doc, JSON_INDENT(1));
    json_decref(doc);
    if (!text)
        abort();
    struct evbuffer *body = new_body();
    evbuffer_add(body, text, strlen(text));
    evbuffer_add(body, "\n", 1);
    free(text);
    reply(req, code, reason, "application/json", body);
    evbuffer_free(body);
}

static void reply_json_error(struct evhttp_request *req, int code, const char *reason,
                             const char *msg)
{
    reply_json(req, code, reason, json_pack("{s:s}", "error", msg));
}

/* ---- pages ---- */

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

static void get_metrics(struct vm_admin *a, struct evhttp_request *req)
{
    struct evbuffer *body = new_body();
    a->ops->metrics(a->owner, body);
    reply(req, 200, "OK", METRICS_CONTENT_TYPE, body);
    evbuffer_free(body);
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
    {"/metrics", get_metrics, "counters and gauges in the Prometheus text format"},
    {"/status", get_status, "sessions, upstreams, pools and counters as JSON"},
};

/* ---- actions: POST /NOUN/NAME/VERB ---- */

/* A session id: decimal digits only, within unsigned. */
static int parse_id(const char *s, unsigned *id)
{
    if (!*s || strlen(s) > 9 || strspn(s, "0123456789") != strlen(s))
        return -1;
    *id = (unsigned)strtoul(s, NULL, 10);
    return 0;
}

static void post_session_disconnect(struct vm_admin *a, struct evhttp_request *req,
                                    const char *name)
{
    unsigned id;
    if (parse_id(name, &id) < 0 || a->ops->disconnect_session(a->owner, id) < 0) {
        char msg[96];
        snprintf(msg, sizeof(msg), "no session %.40s", name);
        reply_json_error(req, 404, "Not Found", msg);
        return;
    }
    vm_info("admin", "session C#%u disconnected on request", id);
    reply_json(req, 200, "OK", json_pack("{s:I}", "disconnected", (json_int_t)id));
}

static void upstream_action(struct vm_admin *a, struct evhttp_request *req, const char *name,
                            const char *action)
{
    const char *state = NULL;
    if (a->ops->upstream_action(a->owner, name, action, &state) < 0) {
        reply_json(req, 404, "Not Found", json_pack("{s:s, s:s}", "error", "no such upstream",
                                                     "upstream", name));
        return;
    }
    vm_info("admin", "upstream %s: %s on request", name, action);
    reply_json(req, 200, "OK", json_pack("{s:s, s:s}", "upstream", name, "state", state));
}

static void post_upstream_pause(struct vm_admin *a, struct evhttp_request *req, const char *name)
{
    upstream_action(a, req, name, "pause");
}

static void post_upstream_resume(struct vm_admin *a, struct evhttp_request *req, const char *name)
{
    upstream_action(a, req, name, "resume");
}

static void post_upstream_drain(struct vm_admin *a, struct evhttp_request *req, const char *name)
{
    upstream_action(a, req, name, "drain");
}

static const struct action {
    const char *noun, *verb;
    void (*post)(struct vm_admin *a, struct evhttp_request *req, const char *name);
    const char *what; /* for the index */
} actions[] = {
    {"sessions", "disconnect", post_session_disconnect, "close that client's connection"},
    {"upstreams", "pause", post_upstream_pause,
     "hold new calls to that upstream (up to pool.reconnect_hold_ms)"},
    {"upstreams", "resume", post_upstream_resume, "end a pause or a drain"},
    {"upstreams", "drain", post_upstream_drain,
     "no new sessions on that upstream; its connections close as they fall idle"},
};

#define NELEMS(a) (sizeof(a) / sizeof((a)[0]))

static void get_index(struct vm_admin *a, struct evhttp_request *req)
{
    struct evbuffer *body = new_body();
    evbuffer_add_printf(body, "virtmux admin endpoint\n");
    for (size_t i = 0; i < NELEMS(pages); i++)
        evbuffer_add_printf(body, "GET  %-32s %s\n", pages[i].path, pages[i].what);
    for (size_t i = 0; i < NELEMS(actions); i++) {
        char path[96];
        snprintf(path, sizeof(path), "/%s/%s/%s", actions[i].noun,
                 !strcmp(actions[i].noun, "sessions") ? "ID" : "NAME", actions[i].verb);
        evbuffer_add_printf(body, "POST %-32s %s\n", path, actions[i].what);
    }
    reply(req, 200, "OK", TEXT_PLAIN, body);
    evbuffer_free(body);
}

static void wrong_method(struct evhttp_request *req, const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", allow);
    reply_text(req, 405, "Method Not Allowed", "method not allowed");
}

/* `path` is /NOUN/NAME/VERB with a known noun and verb: run it (POST only). 0 if it is not. */
static int dispatch_action(struct vm_admin *a, struct evhttp_request *req, const char *path)
{
    char noun[32], name[128], verb[32];
    const char *p = path + 1, *s1 = strchr(p, '/'), *s2 = s1 ? strchr(s1 + 1, '/') : NULL;
    if (!s1 || !s2 || strchr(s2 + 1, '/') || (size_t)(s1 - p) >= sizeof(noun) ||
        (size_t)(s2 - s1 - 1) >= sizeof(name) || strlen(s2 + 1) >= sizeof(verb))
        return 0;
    snprintf(noun, sizeof(noun), "%.*s", (int)(s1 - p), p);
    snprintf(name, sizeof(name), "%.*s", (int)(s2 - s1 - 1), s1 + 1);
    snprintf(verb, sizeof(verb), "%s", s2 + 1);
    for (size_t i = 0; i < NELEMS(actions); i++) {
        if (strcmp(noun, actions[i].noun) != 0 || strcmp(verb, actions[i].verb) != 0)
            continue;
        if (evhttp_request_get_command(req) != EVHTTP_REQ_POST)
            wrong_method(req, "POST");
        else
            actions[i].post(a, req, name);
        return 1;
    }
    return 0;
}

/* ---- the bearer token ---- */

/* Equal, in time that depends only on the length of `want` (the secret). */
static int token_matches(const char *want, const char *got)
{
    size_t wl = strlen(want), gl = strlen(got);
    unsigned char diff = wl != gl;
    for (size_t i = 0; i < wl; i++)
        diff |= (unsigned char)want[i] ^ (unsigned char)(i < gl ? got[i] : 0);
    return diff == 0;
}

static int authorized(const struct vm_admin *a, struct evhttp_request *req)
{
    if (!a->token)
        return 1;
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    while (*h == ' ')
        h++;
    return token_matches(a->token, h);
}

static void dispatch(struct evhttp_request *req, void *arg)
{
    struct vm_admin *a = arg;
    if (!authorized(a, req)) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate",
                          "Bearer realm=\"virtmux\"");
        reply_text(req, 401, "Unauthorized", "unauthorized: this endpoint needs "
                   "\"Authorization: Bearer TOKEN\" (admin.token_file)");
        return;
    }
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    if (!path || !*path)
        path = "/";
    for (size_t i = 0; i < NELEMS(pages); i++) {
        if (strcmp(path, pages[i].path) != 0)
            continue;
        if (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD)
            pages[i].get(a, req);
        else
            wrong_method(req, "GET, HEAD");
        return;
    }
    if (dispatch_action(a, req, path))
        return;
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
    a->token = cfg->admin_token;
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
    /* Requests are small; bound what a client may make us buffer. */
    evhttp_set_max_headers_size(a->http, 16384);
    evhttp_set_max_body_size(a->http, 65536);
    evhttp_set_timeout(a->http, 30);
    evhttp_set_gencb(a->http, dispatch, a);
    vm_info("admin", "admin endpoint on %s (GET /status, /metrics, /healthz)%s", where,
            a->token ? ", bearer token required" : "");
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
