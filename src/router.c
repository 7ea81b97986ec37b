#include "router.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

void route_clear(struct vm_route *r)
{
    free(r->name);
    r->name = NULL;
    r->upstream = NULL;
}

static int segment_is_upstream(const struct vm_config *cfg, const char *seg, size_t seglen)
{
    for (int i = 0; i < cfg->nupstreams; i++)
        if (strlen(cfg->upstreams[i].name) == seglen &&
            strncmp(cfg->upstreams[i].name, seg, seglen) == 0)
            return 1;
    return 0;
}

/* routing.strict: say which segment was taken for an upstream name, and what the names are,
 * so a typo is seen at once instead of as a driver error from default_upstream. */
static void strict_error(const struct vm_config *cfg, const char *name, const char *seg,
                         size_t seglen, char *err, size_t errlen)
{
    int n = snprintf(err, errlen, "no upstream \"%.*s\" (the first path segment of %s); "
                     "routing is strict: open DRIVER:///UPSTREAM/PATH with one of: ",
                     (int)seglen, seg, name);
    for (int i = 0; i < cfg->nupstreams && n >= 0 && (size_t)n < errlen; i++)
        n += snprintf(err + n, errlen - (size_t)n, "%s%s", i ? ", " : "",
                      cfg->upstreams[i].name);
}

int router_resolve(const struct vm_config *cfg, const char *listener_upstream, const char *name,
                   struct vm_route *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof(*r));
    const char *fallback = listener_upstream ? listener_upstream : cfg->default_upstream;

    /* Find the path: "driver://authority/path?query#frag". */
    const char *sep = strstr(name, "://");
    if (sep) {
        const char *path = strpbrk(sep + 3, "/?#");
        if (path && *path == '/') {
            const char *seg = path + 1;
            size_t seglen = strcspn(seg, "/?#");
            if (seglen && cfg->routing_strict && !listener_upstream &&
                !segment_is_upstream(cfg, seg, seglen)) {
                strict_error(cfg, name, seg, seglen, err, errlen);
                return -1;
            }
            for (int i = 0; seglen && i < cfg->nupstreams; i++) {
                const struct vm_upstream_cfg *u = &cfg->upstreams[i];
                if (strlen(u->name) == seglen && strncmp(u->name, seg, seglen) == 0) {
                    /* Strip "/<segment>", keeping what follows; "/hv2" alone becomes "/". */
                    size_t head = (size_t)(path - name);
                    const char *rest = seg + seglen;
                    size_t n = head + strlen(rest) + 2;
                    char *out = malloc(n);
                    if (!out)
                        abort();
                    snprintf(out, n, "%.*s%s%s", (int)head, name, *rest == '/' ? "" : "/", rest);
                    r->upstream = u;
                    r->name = out;
                    return 0;
                }
            }
        }
    }

    if (!fallback) {
        snprintf(err, errlen, "no connection driver available for %s: virtmux has no upstream "
                 "for this name and no default_upstream", name[0] ? name : "(default)");
        return -1;
    }
    r->upstream = config_upstream(cfg, fallback);
    if (!r->upstream) {
        snprintf(err, errlen, "no connection driver available for %s", name);
        return -1;
    }
    r->name = name[0] ? vm_strdup(name) : uri_default_name(&r->upstream->uri);
    return 0;
}
