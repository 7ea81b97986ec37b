#include "admin.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <jansson.h>

#include "config.h"
#include "listener.h"
#include "log.h"
#include "util.h"

struct vm_admin {
    vm_status_fn status;
    vm_upstream_action_fn upstream_action; /* optional */
    void *owner;           /* not owned */
    struct evhttp *http;   /* owned */
    const char *unix_path; /* config snapshot */
};

static void status_cb(struct evhttp_request *req, void *arg)
{
    struct vm_admin *a = arg;
    if (evhttp_request_get_command(req) != EVHTTP_REQ_GET) {
        evhttp_send_error(req, 405, "Method Not Allowed");
        return;
    }
    json_t *st = a->status(a->owner);
    char *text = json_dumps(st, JSON_INDENT(1));
    json_decref(st);
    struct evbuffer *body = evbuffer_new();
    evbuffer_add(body, text, strlen(text));
    evbuffer_add(body, "\n", 1);
    free(text);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, 200, "OK", body);
    evbuffer_free(body);
}

static void send_json(struct evhttp_request *req, int code, const char *reason, json_t *js)
{
    char *text = json_dumps(js, 0);
    json_decref(js);
    struct evbuffer *body = evbuffer_new();
    evbuffer_add_printf(body, "%s\n", text ? text : "{}");
    free(text);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, code, reason, body);
    evbuffer_free(body);
}

/* POST /upstreams/NAME/(pause|resume|drain); everything else not served elsewhere is 404. */
static void other_cb(struct evhttp_request *req, void *arg)
{
    struct vm_admin *a = arg;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    char name[128], action[16], extra;
    if (!a->upstream_action || !path ||
        sscanf(path, "/upstreams/%127[^/]/%15[^/]%c", name, action, &extra) != 2) {
        evhttp_send_error(req, 404, "Not Found");
        return;
    }
    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
        evhttp_send_error(req, 405, "Method Not Allowed");
        return;
    }
    const char *state = NULL;
    int rc = a->upstream_action(a->owner, name, action, &state);
    if (rc == -1)
        send_json(req, 404, "Not Found", json_pack("{s:s, s:s}", "error", "no such upstream",
                                                   "upstream", name));
    else if (rc < 0)
        send_json(req, 404, "Not Found", json_pack("{s:s, s:s}", "error", "no such action "
                                                   "(pause, resume, drain)", "action", action));
    else
        send_json(req, 200, "OK", json_pack("{s:s, s:s}", "upstream", name, "state", state));
}

void admin_set_upstream_action(struct vm_admin *a, vm_upstream_action_fn fn)
{
    a->upstream_action = fn;
}

struct vm_admin *admin_new(struct event_base *base, const struct vm_config *cfg,
                           vm_status_fn status, void *owner)
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
    a->status = status;
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
    evhttp_set_cb(a->http, "/status", status_cb, a);
    evhttp_set_gencb(a->http, other_cb, a);
    vm_info("admin", "status endpoint on %s (GET /status, POST /upstreams/NAME/ACTION)", where);
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
