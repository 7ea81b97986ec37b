#include "router.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

void route_clear(struct vm_route *r)
{
    free(r->name);
    free(r->upname);
    r->name = r->upname = NULL;
    r->upstream = r->tpl = NULL;
}

static const struct vm_upstream_cfg *named_upstream(const struct vm_config *cfg,
                                                    const char *seg, size_t seglen)
{
    for (int i = 0; i < cfg->nupstreams; i++)
        if (strlen(cfg->upstreams[i].name) == seglen &&
            strncmp(cfg->upstreams[i].name, seg, seglen) == 0)
            return &cfg->upstreams[i];
    return NULL;
}

/* The template matching the segment, when no named upstream has its name. */
static const struct vm_upstream_cfg *segment_template(const struct vm_config *cfg,
                                                      const char *seg, size_t seglen)
{
    if (!cfg->ntemplates || seglen > 1024)
        return NULL;
    char buf[1025];
    memcpy(buf, seg, seglen);
    buf[seglen] = 0;
    return config_template(cfg, buf);
}

static int segment_is_upstream(const struct vm_config *cfg, const char *seg, size_t seglen)
{
    return named_upstream(cfg, seg, seglen) || segment_template(cfg, seg, seglen);
}

int router_check_name(const char *name, char *err, size_t errlen)
{
    size_t total = strlen(name), label = 0;
    if (total == 0 || total > 253) {
        snprintf(err, errlen, "upstream name \"%.64s%s\" is %zu characters long: a host name "
                 "has 1 to 253", name, total > 64 ? "..." : "", total);
        return -1;
    }
    if (name[0] == '-' || name[0] == '.') {
        snprintf(err, errlen, "upstream name \"%s\" starts with '%c': a host name starts with a "
                 "letter or digit", name, name[0]);
        return -1;
    }
    for (const char *c = name; *c; c++) {
        if (*c == '.') {
            if (label == 0 || !c[1]) {
                snprintf(err, errlen, "upstream name \"%s\" has an empty label: host name "
                         "labels are separated by single dots", name);
                return -1;
            }
            label = 0;
            continue;
        }
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '-')) {
            snprintf(err, errlen, "upstream name \"%s\" has the character 0x%02x: a host name "
                     "has only letters, digits, '-' and '.'", name, (unsigned char)*c);
            return -1;
        }
        if (++label > 63) {
            snprintf(err, errlen, "upstream name \"%.64s...\" has a label longer than 63 "
                     "characters, the host name limit", name);
            return -1;
        }
    }
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
    for (int i = 0; i < cfg->ntemplates && n >= 0 && (size_t)n < errlen; i++)
        n += snprintf(err + n, errlen - (size_t)n, "%s%s", i || cfg->nupstreams ? ", " : "",
                      cfg->templates[i].name);
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
            const struct vm_upstream_cfg *u = seglen ? named_upstream(cfg, seg, seglen) : NULL;
            const struct vm_upstream_cfg *t = seglen && !u ? segment_template(cfg, seg, seglen)
                                                           : NULL;
            if (t) {
                /* Checked before anything is made from it, let alone connected to. */
                char *upname = vm_strndup(seg, seglen);
                if (router_check_name(upname, err, errlen) < 0) {
                    free(upname);
                    return -1;
                }
                r->tpl = t;
                r->upname = upname;
            }
            if (u || t) {
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
