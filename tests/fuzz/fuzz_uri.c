/* Fuzz the two parsers of libvirt names: upstream URIs (uri_parse, from the config) and the
 * name a client sends in CONNECT_OPEN (router_resolve). Input: "URI\nNAME\nLISTENER-UPSTREAM". */
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "fuzz.h"
#include "router.h"
#include "uri.h"

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static struct vm_config *cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    cfg = config_parse(
        "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
        " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://10.0.0.11/system\"},"
        "   {\"name\":\"hv2\",\"uri\":\"qemu+unix:///system?socket=/run/l.sock&mode=legacy\"},"
        "   {\"name\":\"lab\",\"uri\":\"test+tcp://[::1]:26509/default\"}],"
        " \"default_upstream\":\"hv1\"}", stderr);
    REQUIRE(cfg);
    return 0;
}

static void check_uri(const char *s)
{
    struct vm_uri u;
    char err[256] = "";
    if (uri_parse(s, &u, err, sizeof(err)) < 0) {
        REQUIRE(err[0]);
        REQUIRE(!u.driver && !u.host && !u.path && !u.socket && !u.query);
        return;
    }
    REQUIRE(u.driver && u.driver[0] && u.path);
    if (u.transport == VM_TR_UNIX) {
        REQUIRE(u.socket && !u.host);
    } else {
        REQUIRE(u.host && !u.socket && u.port > 0 && u.port <= 65535);
    }
    char *name = uri_default_name(&u);
    REQUIRE(strncmp(name, u.driver, strlen(u.driver)) == 0);
    free(name);
    char ep[512];
    uri_endpoint(&u, ep, sizeof(ep));
    uri_clear(&u);
}

static void check_route(const char *name, const char *listener_upstream)
{
    struct vm_route r;
    char err[600] = "";
    if (router_resolve(cfg, listener_upstream, name, &r, err, sizeof(err)) < 0) {
        REQUIRE(err[0] && !r.name);
        return;
    }
    REQUIRE(r.upstream && r.name);
    /* A name that routes by its segment loses exactly "/segment"; others pass unchanged. */
    if (name[0] && strcmp(r.name, name) != 0)
        REQUIRE(strlen(r.name) + strlen(r.upstream->name) + 1 >= strlen(name));
    route_clear(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    REQUIRE(s);
    memcpy(s, data, size);
    s[size] = '\0';
    char *name = strchr(s, '\n');
    if (name)
        *name++ = '\0';
    char *lup = name ? strchr(name, '\n') : NULL;
    if (lup)
        *lup++ = '\0';
    check_uri(s);
    check_route(name ? name : s, lup);
    free(s);
    return 0;
}
