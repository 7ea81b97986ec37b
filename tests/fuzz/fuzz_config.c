/* Fuzz the config parser, then the router on what it accepted.
 *
 * Input: JSON text, optionally followed by a NUL byte and connection names separated by
 * newlines. The JSON goes through config_parse; when it is accepted, every name is routed
 * for every listener (each with its own fallback upstream) and with no listener fallback.
 * Checked: an accepted config is consistent (the default upstream and the listeners'
 * upstreams exist, names are unique), a route names an upstream of this config, and a
 * routed name keeps the driver part of what the client sent; a name routed to a template is
 * a valid host name the template matches. Everything is freed: the run
 * is under LeakSanitizer. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "router.h"

static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    devnull = fopen("/dev/null", "w");
    if (!devnull)
        abort();
    vm_log_setup(VM_LOG_ERROR, 0);
    return 0;
}

static int is_upstream_of(const struct vm_config *cfg, const struct vm_upstream_cfg *u)
{
    for (int i = 0; i < cfg->nupstreams; i++)
        if (&cfg->upstreams[i] == u)
            return 1;
    return 0;
}

static void check_config(const struct vm_config *cfg)
{
    if (cfg->nlisteners < 1 || (cfg->nupstreams < 1 && cfg->ntemplates < 1))
        abort();
    for (int i = 0; i < cfg->ntemplates; i++)
        if (!cfg->templates[i].uri_text || !strstr(cfg->templates[i].uri_text, "{name}"))
            abort();
    if (cfg->default_upstream && !config_upstream(cfg, cfg->default_upstream))
        abort();
    for (int i = 0; i < cfg->nlisteners; i++)
        if (cfg->listeners[i].upstream && !config_upstream(cfg, cfg->listeners[i].upstream))
            abort();
    for (int i = 0; i < cfg->nupstreams; i++)
        if (config_upstream(cfg, cfg->upstreams[i].name) != &cfg->upstreams[i])
            abort(); /* a duplicate name would shadow this one */
}

static void route_one(const struct vm_config *cfg, const char *fallback, const char *name)
{
    struct vm_route r;
    char err[600];
    if (router_resolve(cfg, fallback, name, &r, err, sizeof(err)) < 0) {
        if (r.name || strlen(err) >= sizeof(err))
            abort();
        return;
    }
    if (!r.name || (r.upstream && !is_upstream_of(cfg, r.upstream)))
        abort();
    /* Or a template, and a name already checked as a host name, that the template matches
     * and no named upstream has. */
    if (!r.upstream) {
        char e2[300];
        if (!r.tpl || !r.upname || router_check_name(r.upname, e2, sizeof(e2)) < 0 ||
            config_template(cfg, r.upname) != r.tpl || config_upstream(cfg, r.upname))
            abort();
    } else if (r.tpl || r.upname) {
        abort();
    }
    /* "driver://..." keeps its driver part when a routing segment is stripped. */
    const char *sep = strstr(name, "://");
    if (sep && r.name[0] && strncmp(r.name, name, (size_t)(sep - name) + 3) != 0)
        abort();
    route_clear(&r);
    if (r.name)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        abort();
    memcpy(text, data, size);
    text[size] = '\0';
    size_t jlen = strlen(text);
    struct vm_config *cfg = config_parse(text, devnull);
    if (cfg) {
        check_config(cfg);
        char *names = jlen < size ? text + jlen + 1 : NULL;
        char *save = NULL;
        for (char *name = names ? strtok_r(names, "\n", &save) : NULL; name;
             name = strtok_r(NULL, "\n", &save)) {
            route_one(cfg, NULL, name);
            for (int i = 0; i < cfg->nlisteners; i++)
                route_one(cfg, cfg->listeners[i].upstream, name);
        }
        if (names && !names[0])
            route_one(cfg, NULL, "");
        config_free(cfg);
    }
    free(text);
    return 0;
}
