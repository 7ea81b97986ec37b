#include "admin.h"

#include <errno.h>
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
    vm_info("admin", "status endpoint on %s (GET /status)", where);
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
