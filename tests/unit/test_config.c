/* Config validation: good files load, bad ones fail with errors that name the JSON path. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "config.h"
#include "proc.h"

/* Parse `json`; return the error text (static buffer), or NULL when it loaded. */
static const char *errors_of(const char *json)
{
    static char buf[4096];
    FILE *f = fmemopen(buf, sizeof(buf), "w");
    struct vm_config *cfg = config_parse(json, f);
    fclose(f);
    if (cfg) {
        config_free(cfg);
        return NULL;
    }
    return buf;
}

#define UP "\"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://10.0.0.11/system\"}]"

int main(void)
{
    struct vm_config *cfg = config_parse(
        "{\"listeners\":[{\"name\":\"tcp\",\"address\":\"127.0.0.1:16509\",\"auth\":\"none\"},"
        " {\"name\":\"local\",\"unix\":\"/run/virtmux/libvirt-sock\",\"mode\":\"0660\","
        "  \"auth\":\"none\",\"upstream\":\"hv1\"}],"
        " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://10.0.0.11/system\","
        "   \"pool\":{\"max_connections\":2,\"max_inflight\":3,\"idle_timeout_s\":9}},"
        "  {\"name\":\"hv2\",\"uri\":\"qemu+unix:///system?socket=/run/libvirt/libvirt-sock\"}],"
        " \"default_upstream\":\"hv1\","
        " \"limits\":{\"max_clients\":10,\"queue_timeout_ms\":250}}", stderr);
    CHECK(cfg != NULL);
    if (cfg) {
        CHECK(cfg->nlisteners == 2 && cfg->nupstreams == 2);
        CHECK(cfg->listeners[1].mode == 0660);
        CHECK_STR(cfg->listeners[1].upstream, "hv1");
        CHECK(cfg->upstreams[0].pool.max_connections == 2);
        CHECK(cfg->upstreams[0].pool.max_inflight == 3);
        CHECK(cfg->upstreams[0].pool.idle_timeout_s == 9);
        CHECK(cfg->upstreams[1].pool.max_connections == 4); /* default */
        CHECK(cfg->upstreams[1].pool.max_inflight == 4);
        CHECK(cfg->upstreams[0].uri.transport == VM_TR_TCP);
        CHECK(cfg->upstreams[0].uri.port == 16509);
        CHECK_STR(cfg->upstreams[0].uri.host, "10.0.0.11");
        CHECK(cfg->upstreams[1].uri.transport == VM_TR_UNIX);
        CHECK_STR(cfg->upstreams[1].uri.socket, "/run/libvirt/libvirt-sock");
        CHECK_STR(cfg->upstreams[1].uri.path, "/system");
        CHECK(cfg->max_clients == 10 && cfg->queue_timeout_ms == 250);
        CHECK(cfg->max_client_requests == 16);
        config_free(cfg);
    }

    cfg = config_parse("{\"listeners\":[{\"unix\":\"/run/virtmux/s\"}]," UP "}", stderr);
    CHECK(cfg && cfg->listeners[0].mode == 0660); /* owner and group only by default */
    CHECK(cfg && cfg->max_unauthenticated == 20 && cfg->max_unauthenticated_per_source == 5);
    config_free(cfg);
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                       ",\"limits\":{\"max_unauthenticated\":3}}", stderr);
    CHECK(cfg && cfg->max_unauthenticated_per_source == 3); /* the default never exceeds it */
    config_free(cfg);

    const char *e;
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a\",\"uri\":\"qemu+tcp://h/system\"},"
                  "                {\"name\":\"b\",\"uri\":\"qemu+ssh://h/system\"}]}");
    CHECK(e && strstr(e, "upstreams[1].uri: unsupported transport \"ssh\""));
    e = errors_of("{" UP "}");
    CHECK(e && strstr(e, "listeners: must be a non-empty array"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"unix\":\"/x\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[0]: needs exactly one of"));
    e = errors_of("{\"listeners\":[{\"address\":\"nohost\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].address"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"auth\":\"kerberos\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].auth: unsupported auth \"kerberos\""));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"upstream\":\"nope\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].upstream: no upstream is called \"nope\""));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP ",\"default_upstream\":\"x\"}");
    CHECK(e && strstr(e, "default_upstream: no upstream is called \"x\""));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a\",\"uri\":\"qemu+tcp://h/system\","
                  " \"pool\":{\"max_inflight\":0}}]}");
    CHECK(e && strstr(e, "upstreams[0].pool.max_inflight: 0 is out of range"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a\",\"uri\":\"qemu+tcp://h/system\"},"
                  "                {\"name\":\"a\",\"uri\":\"qemu+tcp://g/system\"}]}");
    CHECK(e && strstr(e, "upstreams[1].name: \"a\" is already used"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP ",\"limitz\":{}}");
    CHECK(e && strstr(e, "limitz: unknown key"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a\",\"uri\":\"qemu+tcp://h:99999/system\"}]}");
    CHECK(e && strstr(e, "upstreams[0].uri: bad port"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a b\",\"uri\":\"qemu+tcp://h/system\"}]}");
    CHECK(e && strstr(e, "upstreams[0].name"));
    /* Authentication settings. */
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"auth\":\"tls\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].auth: \"tls\" needs a \"tls\" object"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"auth\":\"peer\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].auth: \"peer\" needs a unix listener"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"auth\":\"sasl\"}]," UP "}");
    CHECK(e && strstr(e, "sasl: a listener uses SASL"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"tls\":{\"cert\":\"/nonexistent/c\","
                  "\"key\":\"/nonexistent/k\",\"ca\":\"/nonexistent/ca\"}}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].tls.cert: cannot read \"/nonexistent/c\""));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a\",\"uri\":\"qemu+tls://h/system\"}]}");
    CHECK(e && strstr(e, "upstreams[0].tls: a tls:// upstream needs"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  " \"upstreams\":[{\"name\":\"a\",\"uri\":\"qemu+tcp://h/system\","
                  " \"sasl\":{\"password_file\":\"/nonexistent/pw\"}}]}");
    CHECK(e && strstr(e, "upstreams[0].sasl.username: missing"));
    CHECK(e && strstr(e, "upstreams[0].sasl.password_file: cannot read"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                  ",\"sasl\":{\"mechanisms\":[\"plain\"]}}");
    CHECK(e && strstr(e, "sasl.mechanisms: \"plain\" is not"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                  ",\"limits\":{\"max_unauthenticated\":4,\"max_unauthenticated_per_source\":6}}");
    CHECK(e && strstr(e, "limits.max_unauthenticated_per_source: 6 is more than "
                         "limits.max_unauthenticated (4)"));
    /* DIGEST-MD5 leaks in cyrus-sasl: offered only when listed */
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP ",\"sasl\":{}}",
                       stderr);
    CHECK(cfg && cfg->sasl);
    if (cfg && cfg->sasl)
        CHECK_STR(cfg->sasl->mechanisms, "scram-sha-256 gssapi");
    config_free(cfg);
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                       ",\"sasl\":{\"mechanisms\":[\"digest-md5\",\"scram-sha-256\"]}}",
                       stderr);
    CHECK(cfg && cfg->sasl);
    if (cfg && cfg->sasl)
        CHECK_STR(cfg->sasl->mechanisms, "digest-md5 scram-sha-256");
    config_free(cfg);
    e = errors_of("not json");
    CHECK(e && strstr(e, "(string):1"));
    /* listeners: one name, one address or socket each (start-up would fail on its own port) */
    e = errors_of("{\"listeners\":[{\"name\":\"a\",\"address\":\"127.0.0.1:1\"},"
                  "{\"name\":\"a\",\"address\":\"127.0.0.1:2\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[1].name: \"a\" is already used by listeners[0]"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"},{\"address\":\"127.0.0.1:1\"}],"
                  UP "}");
    CHECK(e && strstr(e, "listeners[1].address: \"127.0.0.1:1\" is already used by listeners[0]"));
    e = errors_of("{\"listeners\":[{\"unix\":\"/run/v/s\"},{\"unix\":\"/run/v/s\"}]," UP "}");
    CHECK(e && strstr(e, "listeners[1].unix: \"/run/v/s\" is already used by listeners[0]"));
    CHECK(errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"},{\"unix\":\"/run/v/s\"}]," UP
                    "}") == NULL);
    /* PROXY protocol: TCP and TLS listeners only (a unix client is its credentials) */
    e = errors_of("{\"listeners\":[{\"unix\":\"/run/v/s\",\"proxy_protocol\":true}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].proxy_protocol: only TCP and TLS listeners"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"proxy_protocol\":1}]," UP "}");
    CHECK(e && strstr(e, "listeners[0].proxy_protocol: must be true or false"));
    CHECK(errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\",\"proxy_protocol\":true}],"
                    UP "}") == NULL);
    /* a bad entry in a rule's upstreams must not lose the names after it (found by
     * fuzz_config as a leak; the sanitizer stage runs this with LeakSanitizer) */
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                  ",\"policy\":{\"rules\":[{\"match\":{},\"upstreams\":[5,\"hv1\"]}]}}");
    CHECK(e && strstr(e, "policy.rules[0].upstreams: entry 0 must be a string"));

    /* limits.drain_timeout_s: 30 by default, 0 (cut at once) to 3600 */
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP "}", stderr);
    CHECK(cfg && cfg->drain_timeout_s == 30);
    config_free(cfg);
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                       ",\"limits\":{\"drain_timeout_s\":0}}", stderr);
    CHECK(cfg && cfg->drain_timeout_s == 0);
    config_free(cfg);
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP
                  ",\"limits\":{\"drain_timeout_s\":3601}}");
    CHECK(e && strstr(e, "limits.drain_timeout_s"));

    /* What a reload compares: two parses of one file are "the same" entry by entry, and
     * each snapshot owns only its own entries. */
    const char *two = "{\"listeners\":[{\"name\":\"a\",\"address\":\"127.0.0.1:1\"},"
                      "{\"name\":\"b\",\"unix\":\"/run/v/s\",\"mode\":\"0660\"}],"
                      "\"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://h/system\","
                      "\"pool\":{\"max_connections\":2}}],"
                      "\"policy\":{\"rules\":[{\"match\":{},\"readonly\":true}]}}";
    struct vm_config *a1 = config_parse(two, stderr), *a2 = config_parse(two, stderr);
    CHECK(a1 && a2);
    if (a1 && a2) {
        CHECK(config_upstream_same(&a1->upstreams[0], &a2->upstreams[0]));
        CHECK(config_listener_same_socket(&a1->listeners[0], &a2->listeners[0]));
        CHECK(config_listener_same_socket(&a1->listeners[1], &a2->listeners[1]));
        CHECK(!config_listener_same_socket(&a1->listeners[0], &a2->listeners[1]));
        CHECK(config_sasl_same(a1->sasl, a2->sasl));
        a2->upstreams[0].pool.max_connections = 3;
        CHECK(!config_upstream_same(&a1->upstreams[0], &a2->upstreams[0]));
        a2->listeners[1].mode = 0600;
        CHECK(!config_listener_same_socket(&a1->listeners[1], &a2->listeners[1]));
        CHECK(config_owns(a1, &a1->listeners[1]) && config_owns(a1, &a1->upstreams[0]));
        CHECK(config_owns(a1, &a1->rules[0]) && config_owns(a1, &a1->default_rule));
        CHECK(!config_owns(a1, &a2->listeners[0]) && !config_owns(a1, &a2->rules[0]));
        CHECK(!config_owns(a1, NULL));
    }
    config_free(a1);
    config_free(a2);

    /* upstreams[].cache and pool.coalesce: off / on by default; only "yes" plain calls */
    cfg = config_parse("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}]," UP "}", stderr);
    CHECK(cfg && !cfg->upstreams[0].cache.enabled && cfg->upstreams[0].pool.coalesce == 1);
    config_free(cfg);
    const char *cached = "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                         "\"upstreams\":[{\"name\":\"hv1\",\"uri\":\"test:///default\","
                         "\"pool\":{\"coalesce\":false},\"cache\":{\"procedures\":"
                         "[\"CONNECT_LIST_ALL_DOMAINS\",\"DOMAIN_GET_INFO\"]}}]}";
    a1 = config_parse(cached, stderr);
    a2 = config_parse(cached, stderr);
    CHECK(a1 && a2);
    if (a1 && a2) {
        const struct vm_cache_cfg *cc = &a1->upstreams[0].cache;
        CHECK(cc->enabled && cc->ttl_ms == 1000 && !cc->readwrite && cc->max_entries == 1024 &&
              cc->max_bytes == 16 << 20 && cc->nprocs == 2);
        CHECK(cc->nprocs == 2 && cc->procs[1]->proc == VM_PROC_DOMAIN_GET_INFO);
        CHECK(a1->upstreams[0].pool.coalesce == 0);
        CHECK(config_upstream_same(&a1->upstreams[0], &a2->upstreams[0]));
        a2->upstreams[0].cache.ttl_ms = 5;
        CHECK(!config_upstream_same(&a1->upstreams[0], &a2->upstreams[0]));
    }
    config_free(a1);
    config_free(a2);
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  "\"upstreams\":[{\"name\":\"hv1\",\"uri\":\"test:///default\","
                  "\"cache\":{\"procedures\":[\"DOMAIN_SET_AUTOSTART\"]}}]}");
    CHECK(e && strstr(e, "upstreams[0].cache.procedures: \"DOMAIN_SET_AUTOSTART\" cannot be "
                         "cached"));
    e = errors_of("{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
                  "\"upstreams\":[{\"name\":\"hv1\",\"uri\":\"test:///default\","
                  "\"cache\":{\"procedures\":[\"DOMAIN_GET_INFO\"],\"ttl\":3}}]}");
    CHECK(e && strstr(e, "upstreams[0].cache.ttl: unknown key"));
    /* upstream_templates: the upstream parser's keys with "match" for "name"; {name} needed;
     * templates alone are enough; limits.max_upstreams. */
#define LS "\"listeners\":[{\"address\":\"127.0.0.1:1\"}]"
    cfg = config_parse("{" LS ", \"upstream_templates\":[{\"match\":\"hv-*\","
                       " \"uri\":\"qemu+tcp://{name}.dc/system\", \"pool\":{\"max_connections\":2}}],"
                       " \"limits\":{\"max_upstreams\":7}}",
                       stderr);
    CHECK(cfg != NULL);
    if (cfg) {
        CHECK(cfg->nupstreams == 0 && cfg->ntemplates == 1 && cfg->max_upstreams == 7);
        CHECK_STR(cfg->templates[0].name, "hv-*");
        CHECK_STR(cfg->templates[0].uri_text, "qemu+tcp://{name}.dc/system");
        CHECK(cfg->templates[0].pool.max_connections == 2);
        CHECK(config_owns(cfg, &cfg->templates[0]));
        config_free(cfg);
    }
    e = errors_of("{" LS "}");
    CHECK(e && strstr(e, "upstreams: must be a non-empty array (or give upstream_templates)"));
    e = errors_of("{" LS ", \"upstream_templates\":[{\"match\":\"hv-*\",\"uri\":\"qemu+tcp://h/system\"}]}");
    CHECK(e && strstr(e, "upstream_templates[0].uri: has no {name}"));
    e = errors_of("{" LS ", \"upstream_templates\":[{\"match\":\"a/b\",\"uri\":\"qemu+tcp://{name}/s\"}]}");
    CHECK(e && strstr(e, "upstream_templates[0].match: \"a/b\" may only contain"));
    e = errors_of("{" LS ", \"upstream_templates\":[{\"uri\":\"qemu+tcp://{name}/s\"}]}");
    CHECK(e && strstr(e, "upstream_templates[0].match"));
    e = errors_of("{" LS ", \"upstream_templates\":[{\"match\":\"x*\",\"uri\":\"ssh://{name}/s\"}]}");
    CHECK(e && strstr(e, "upstream_templates[0].uri: "));
    e = errors_of("{" LS ", \"upstream_templates\":[{\"match\":\"x*\",\"uri\":\"qemu+tcp://{name}/s\","
                  "\"bogus\":{}}]}");
    CHECK(e && strstr(e, "upstream_templates[0].bogus: unknown key"));
    e = errors_of("{" LS ", \"upstream_templates\":{}}");
    CHECK(e && strstr(e, "upstream_templates: must be an array"));
    e = errors_of("{" LS "," UP ", \"limits\":{\"max_upstreams\":0}}");
    CHECK(e && strstr(e, "limits.max_upstreams"));
    e = errors_of("{" LS "," UP ", \"policy\":{\"default\":{\"upstreams\":[\"hv9\"]}}}");
    CHECK(e && strstr(e, "no upstream is called \"hv9\" and no upstream_templates[].match"));
    CHECK(!errors_of("{" LS "," UP ", \"policy\":{\"default\":{\"upstreams\":[\"hv*\"]}}}"));
    /* A template glob that matches a libvirt path word is warned about, once per template. */
    cfg = config_parse("{" LS ", \"upstream_templates\":[{\"match\":\"*\",\"uri\":\"qemu+tcp://{name}/s\"},"
                       " {\"match\":\"hv-*\",\"uri\":\"qemu+tcp://{name}/s\"}]}", stderr);
    CHECK(cfg != NULL);
    if (cfg) {
        char wbuf[2048] = "";
        FILE *wf = fmemopen(wbuf, sizeof(wbuf), "w");
        CHECK(config_warn(cfg, wf) == 1);
        fclose(wf);
        CHECK(strstr(wbuf, "upstream_templates[0].match: \"*\" matches \"system\"") != NULL);
        config_free(cfg);
    }
#undef LS
    return check_done();
}
