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
