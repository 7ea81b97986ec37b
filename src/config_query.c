/* Questions asked of a loaded config: lookups by name, whether a pointer is one of its
 * entries (what keeps a snapshot alive), whether a reload changed an upstream, listener or
 * the sasl section, and the warnings --check-config and start-up print. Parsing is in
 * config.c. */
#include "config.h"

#include <fnmatch.h>
#include <stdio.h>
#include <string.h>

#include "util.h"

/* First path segments that ordinary libvirt URIs use: qemu:///system, qemu:///session,
 * qemu:///embed?root=..., test:///default, lxc:///system, and the test driver's file paths
 * (test:///tmp/node.xml, test:///home/..., ...). An upstream with such a name takes every
 * such URI away from default_upstream. */
static const char *const path_words[][2] = {
    {"system", "qemu:///system"},   {"session", "qemu:///session"},
    {"embed", "qemu:///embed?root=..."}, {"default", "test:///default"},
    {"tmp", "test:///tmp/FILE.xml"}, {"home", "test:///home/FILE.xml"},
    {"var", "test:///var/FILE.xml"}, {"etc", "test:///etc/FILE.xml"},
    {"usr", "test:///usr/FILE.xml"}, {"opt", "test:///opt/FILE.xml"},
    {"srv", "test:///srv/FILE.xml"}, {"root", "test:///root/FILE.xml"},
    {"run", "test:///run/FILE.xml"},
};

int config_warn(const struct vm_config *cfg, FILE *out)
{
    int n = 0;
    for (int i = 0; i < cfg->nupstreams; i++) {
        const char *name = cfg->upstreams[i].name;
        for (size_t w = 0; name && w < sizeof(path_words) / sizeof(path_words[0]); w++) {
            if (strcmp(name, path_words[w][0]) != 0)
                continue;
            fprintf(out, "warning: upstreams[%d].name: \"%s\" is also a path segment of "
                    "ordinary libvirt URIs (%s): clients opening them reach this upstream, "
                    "not default_upstream; consider another name\n", i, name,
                    path_words[w][1]);
            n++;
        }
    }
    /* A template whose glob matches such a word makes an upstream of it: "qemu:///system"
     * would go to a host called "system". */
    for (int i = 0; i < cfg->ntemplates; i++) {
        const char *match = cfg->templates[i].name;
        for (size_t w = 0; match && w < sizeof(path_words) / sizeof(path_words[0]); w++) {
            if (fnmatch(match, path_words[w][0], 0) != 0)
                continue;
            fprintf(out, "warning: upstream_templates[%d].match: \"%s\" matches \"%s\", a path "
                    "segment of ordinary libvirt URIs (%s): clients opening them make an "
                    "upstream called \"%s\" instead of reaching default_upstream; consider a "
                    "narrower glob\n", i, match, path_words[w][0], path_words[w][1],
                    path_words[w][0]);
            n++;
            break;
        }
    }
    return n;
}

const struct vm_upstream_cfg *config_upstream(const struct vm_config *cfg, const char *name)
{
    for (int i = 0; i < cfg->nupstreams; i++)
        if (cfg->upstreams[i].name && strcmp(cfg->upstreams[i].name, name) == 0)
            return &cfg->upstreams[i];
    return NULL;
}

const struct vm_upstream_cfg *config_template(const struct vm_config *cfg, const char *name)
{
    for (int i = 0; i < cfg->ntemplates; i++)
        if (cfg->templates[i].name && fnmatch(cfg->templates[i].name, name, 0) == 0)
            return &cfg->templates[i];
    return NULL;
}

int config_owns(const struct vm_config *cfg, const void *p)
{
    const char *c = p;
    if (!c)
        return 0;
    if (cfg->nlisteners && c >= (const char *)cfg->listeners &&
        c < (const char *)(cfg->listeners + cfg->nlisteners))
        return 1;
    if (cfg->nupstreams && c >= (const char *)cfg->upstreams &&
        c < (const char *)(cfg->upstreams + cfg->nupstreams))
        return 1;
    if (cfg->ntemplates && c >= (const char *)cfg->templates &&
        c < (const char *)(cfg->templates + cfg->ntemplates))
        return 1;
    if (cfg->nrules && c >= (const char *)cfg->rules && c < (const char *)(cfg->rules + cfg->nrules))
        return 1;
    return c == (const char *)&cfg->default_rule;
}

static int same_tls(const struct vm_tls_cfg *a, const struct vm_tls_cfg *b)
{
    if (!a || !b)
        return a == b;
    return vm_streq(a->cert, b->cert) && vm_streq(a->key, b->key) && vm_streq(a->ca, b->ca) &&
           vm_streq(a->crl, b->crl) && a->no_verify == b->no_verify &&
           vm_streq(a->server_name, b->server_name);
}

/* A pool's cache is made with its pool: a changed cache section needs new pools. */
static int same_cache(const struct vm_cache_cfg *a, const struct vm_cache_cfg *b)
{
    if (a->enabled != b->enabled || a->ttl_ms != b->ttl_ms || a->readwrite != b->readwrite ||
        a->max_entries != b->max_entries || a->max_bytes != b->max_bytes ||
        a->nprocs != b->nprocs)
        return 0;
    for (int i = 0; i < a->nprocs; i++)
        if (a->procs[i] != b->procs[i])
            return 0;
    return 1;
}

int config_upstream_same(const struct vm_upstream_cfg *a, const struct vm_upstream_cfg *b)
{
    return vm_streq(a->name, b->name) && vm_streq(a->uri_text, b->uri_text) &&
           same_cache(&a->cache, &b->cache) &&
           memcmp(&a->pool, &b->pool, sizeof(a->pool)) == 0 && same_tls(a->tls, b->tls) &&
           vm_streq(a->sasl_user, b->sasl_user) &&
           vm_streq(a->sasl_password_file, b->sasl_password_file);
}

int config_listener_same_socket(const struct vm_listener_cfg *a, const struct vm_listener_cfg *b)
{
    return vm_streq(a->address, b->address) && vm_streq(a->unix_path, b->unix_path) &&
           a->mode == b->mode && !a->tls == !b->tls;
}

int config_sasl_same(const struct vm_sasl_cfg *a, const struct vm_sasl_cfg *b)
{
    if (!a || !b)
        return a == b;
    int same_users = !a->allowed_users == !b->allowed_users;
    for (int i = 0; same_users && a->allowed_users && (a->allowed_users[i] || b->allowed_users[i]);
         i++)
        same_users = vm_streq(a->allowed_users[i], b->allowed_users[i]);
    return same_users && vm_streq(a->sasldb, b->sasldb) && vm_streq(a->mechanisms, b->mechanisms) &&
           vm_streq(a->keytab, b->keytab) && vm_streq(a->service_host, b->service_host) &&
           a->max_failures == b->max_failures && a->failure_window_s == b->failure_window_s;
}
