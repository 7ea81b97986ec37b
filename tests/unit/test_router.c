/* Table-driven routing: which upstream a CONNECT_OPEN name reaches, and the name sent there. */
#include <stdlib.h>

#include "check.h"
#include "config.h"
#include "router.h"

static const char *cfg_json =
    "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
    " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://10.0.0.11/system\"},"
    "                {\"name\":\"hv2\",\"uri\":\"qemu+unix:///system?socket=/run/l.sock\"},"
    "                {\"name\":\"lab\",\"uri\":\"test+tcp://127.0.0.1:26509/default\"}],"
    " \"default_upstream\":\"hv1\"}";

struct row {
    const char *listener_upstream;
    const char *name;
    const char *want_upstream; /* NULL: must fail */
    const char *want_name;
};

static const struct row rows[] = {
    {NULL, "qemu:///system", "hv1", "qemu:///system"},
    {NULL, "qemu:///hv2/system", "hv2", "qemu:///system"},
    {NULL, "qemu:///hv2/system?foo=bar#frag", "hv2", "qemu:///system?foo=bar#frag"},
    {NULL, "test:///lab/default", "lab", "test:///default"},
    {NULL, "qemu:///hv2", "hv2", "qemu:///"},
    {NULL, "qemu:///hv2x/system", "hv1", "qemu:///hv2x/system"},
    {NULL, "qemu:///session", "hv1", "qemu:///session"},
    {NULL, "", "hv1", "qemu:///system"},
    {"lab", "", "lab", "test:///default"},
    {"lab", "test:///default", "lab", "test:///default"},
    {"lab", "qemu:///hv2/system", "hv2", "qemu:///system"},
    {NULL, "qemu://", "hv1", "qemu://"},
    {NULL, "zzz", "hv1", "zzz"},
    {NULL, "test:////lab/file.xml", "hv1", "test:////lab/file.xml"},
};

int main(void)
{
    struct vm_config *cfg = config_parse(cfg_json, stderr);
    CHECK(cfg != NULL);
    if (!cfg)
        return check_done();
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        struct vm_route r;
        char err[256];
        int rc = router_resolve(cfg, rows[i].listener_upstream, rows[i].name, &r, err, sizeof(err));
        CHECK(rc == 0);
        if (rc == 0) {
            CHECK_STR(r.upstream->name, rows[i].want_upstream);
            CHECK_STR(r.name, rows[i].want_name);
        }
        route_clear(&r);
    }
    /* Without a default, an unrouted name fails and the message names what was asked. */
    free(cfg->default_upstream);
    cfg->default_upstream = NULL;
    struct vm_route r;
    char err[256];
    CHECK(router_resolve(cfg, NULL, "qemu:///nowhere/system", &r, err, sizeof(err)) < 0);
    CHECK(strstr(err, "qemu:///nowhere/system") != NULL);
    CHECK(strncmp(err, "no connection driver available for ", 35) == 0);
    CHECK(router_resolve(cfg, NULL, "qemu:///hv2/system", &r, err, sizeof(err)) == 0);
    route_clear(&r);
    config_free(cfg);

    /* routing.strict: a first segment that is no upstream is an error naming the upstreams,
     * whether mistyped or an ordinary path; no path, or a listener's own upstream, still
     * routes. */
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                       " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://10.0.0.11/system\"},"
                       "  {\"name\":\"hv2\",\"uri\":\"qemu+tcp://10.0.0.12/system\"}],"
                       " \"default_upstream\":\"hv1\", \"routing\": {\"strict\": true}}", stderr);
    CHECK(cfg && cfg->routing_strict);
    if (!cfg)
        return check_done();
    CHECK(router_resolve(cfg, NULL, "qemu:///hv3/system", &r, err, sizeof(err)) < 0);
    CHECK_STR(err, "no upstream \"hv3\" (the first path segment of qemu:///hv3/system); "
              "routing is strict: open DRIVER:///UPSTREAM/PATH with one of: hv1, hv2");
    CHECK(router_resolve(cfg, NULL, "qemu:///system", &r, err, sizeof(err)) < 0);
    CHECK(strstr(err, "no upstream \"system\"") != NULL);
    CHECK(router_resolve(cfg, NULL, "qemu:///hv2/system", &r, err, sizeof(err)) == 0);
    CHECK_STR(r.name, "qemu:///system");
    route_clear(&r);
    CHECK(router_resolve(cfg, NULL, "", &r, err, sizeof(err)) == 0);
    CHECK_STR(r.upstream->name, "hv1");
    route_clear(&r);
    CHECK(router_resolve(cfg, "hv2", "qemu:///system", &r, err, sizeof(err)) == 0);
    CHECK_STR(r.upstream->name, "hv2");
    route_clear(&r);
    config_free(cfg);
    return check_done();
}
