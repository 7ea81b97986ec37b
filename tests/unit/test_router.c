/* Table-driven routing: which upstream a CONNECT_OPEN name reaches, and the name sent there. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Host-name rule for names made from templates: table of (name, accepted, words of the rule). */
static void test_names(void)
{
    static const struct {
        const char *name;
        int ok;
        const char *why;
    } names[] = {
        {"hv-0042", 1, NULL},
        {"127.0.0.5", 1, NULL},
        {"node1.dc.example", 1, NULL},
        {"A-b-C", 1, NULL},
        {"x", 1, NULL},
        {"", 0, "1 to 253"},
        {"-hv", 0, "starts with '-'"},
        {".hv", 0, "starts with '.'"},
        {"hv..1", 0, "empty label"},
        {"hv.", 0, "empty label"},
        {"hv_1", 0, "0x5f"},
        {"hv 1", 0, "0x20"},
        {"hv%2f", 0, "0x25"},
        {"h\xc3\xa9", 0, "0xc3"},
        {"hv:1", 0, "0x3a"},
        {"hv*", 0, "0x2a"},
    };
    char err[300];
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        err[0] = 0;
        int rc = router_check_name(names[i].name, err, sizeof(err));
        CHECK(rc == (names[i].ok ? 0 : -1));
        if (names[i].why)
            CHECK(strstr(err, names[i].why) != NULL);
    }
    /* The length caps: 63 per label, 253 in all (4 labels of 63 = 255 > 253). */
    char label[80], name[300];
    memset(label, 'a', 63);
    label[63] = 0;
    CHECK(router_check_name(label, err, sizeof(err)) == 0);
    strcat(label, "a");
    CHECK(router_check_name(label, err, sizeof(err)) < 0);
    CHECK(strstr(err, "longer than 63") != NULL);
    label[63] = 0;
    snprintf(name, sizeof(name), "%s.%s.%s.%.61s", label, label, label, label);
    CHECK(strlen(name) == 253);
    CHECK(router_check_name(name, err, sizeof(err)) == 0);
    snprintf(name, sizeof(name), "%s.%s.%s.%.62s", label, label, label, label);
    CHECK(router_check_name(name, err, sizeof(err)) < 0);
    CHECK(strstr(err, "254 characters") != NULL);
}

/* Templates: the first matching glob wins, named upstreams win over templates, the segment
 * is stripped like a named one's, a bad name is an error, strict routing accepts them. */
static void test_templates(void)
{
    const char *json =
        "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
        " \"upstreams\":[{\"name\":\"hv-1\",\"uri\":\"qemu+tcp://10.0.0.11/system\"}],"
        " \"upstream_templates\":["
        "   {\"match\":\"hv-*\",\"uri\":\"qemu+tcp://{name}.dc.example/system\"},"
        "   {\"match\":\"127.0.0.*\",\"uri\":\"test+tcp://{name}:16509/default\"},"
        "   {\"match\":\"*\",\"uri\":\"qemu+tcp://{name}/system\"}],"
        " \"routing\":{\"strict\":true}}";
    struct vm_config *cfg = config_parse(json, stderr);
    CHECK(cfg != NULL);
    if (!cfg)
        return;
    CHECK(cfg->ntemplates == 3 && cfg->max_upstreams == 1024);
    static const struct {
        const char *open, *tpl, *upname, *name; /* tpl NULL: the named upstream hv-1 */
    } trows[] = {
        {"qemu:///hv-2/system", "hv-*", "hv-2", "qemu:///system"},
        {"qemu+tcp://gw/hv-0042/system?x=1", "hv-*", "hv-0042", "qemu+tcp://gw/system?x=1"},
        {"test:///127.0.0.5/default", "127.0.0.*", "127.0.0.5", "test:///default"},
        {"qemu:///box7", "*", "box7", "qemu:///"},
        {"qemu:///hv-1/system", NULL, NULL, "qemu:///system"},
    };
    char err[600];
    for (size_t i = 0; i < sizeof(trows) / sizeof(trows[0]); i++) {
        struct vm_route r;
        CHECK(router_resolve(cfg, NULL, trows[i].open, &r, err, sizeof(err)) == 0);
        CHECK_STR(r.name, trows[i].name);
        if (trows[i].tpl) {
            CHECK(r.upstream == NULL && r.tpl != NULL);
            if (r.tpl)
                CHECK_STR(r.tpl->name, trows[i].tpl);
            CHECK_STR(r.upname, trows[i].upname);
        } else {
            CHECK(r.tpl == NULL && r.upstream && !strcmp(r.upstream->name, "hv-1"));
        }
        route_clear(&r);
    }
    struct vm_route r;
    CHECK(router_resolve(cfg, NULL, "qemu:///hv_2/system", &r, err, sizeof(err)) < 0);
    CHECK(strstr(err, "upstream name \"hv_2\" has the character 0x5f") != NULL);
    CHECK(r.name == NULL && r.upname == NULL);
    /* {name} filled in */
    char *u = uri_expand(cfg->templates[0].uri_text, "hv-7");
    CHECK_STR(u, "qemu+tcp://hv-7.dc.example/system");
    free(u);
    u = uri_expand("a{name}b{name}{nam", "x");
    CHECK_STR(u, "axbx{nam");
    free(u);
    /* config_template: first match in order */
    CHECK(config_template(cfg, "hv-9") == &cfg->templates[0]);
    CHECK(config_template(cfg, "127.0.0.9") == &cfg->templates[1]);
    CHECK(config_template(cfg, "zz") == &cfg->templates[2]);
    config_free(cfg);
}

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
    test_templates();
    test_names();
    return check_done();
}
