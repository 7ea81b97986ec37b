#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fnmatch.h>
#include <grp.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <jansson.h>

#include "log.h"
#include "proc.h"
#include "util.h"

struct parse_ctx {
    FILE *errs;
    int nerr;
};

static void VM_PRINTF(3, 4) cfg_error(struct parse_ctx *ctx, const char *path, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (ctx->errs) {
        fprintf(ctx->errs, "%s: ", path);
        vfprintf(ctx->errs, fmt, ap);
        fputc('\n', ctx->errs);
    }
    va_end(ap);
    ctx->nerr++;
}

/* Complain about keys of `obj` not in `known` (a NULL-terminated list): typos must not pass. */
static void check_keys(struct parse_ctx *ctx, const char *path, json_t *obj, const char *const *known)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        int ok = 0;
        for (const char *const *k = known; *k; k++)
            if (strcmp(*k, key) == 0)
                ok = 1;
        if (!ok) {
            char p[256];
            snprintf(p, sizeof(p), "%s%s%s", path, path[0] ? "." : "", key);
            cfg_error(ctx, p, "unknown key");
        }
    }
}

static const char *get_string(struct parse_ctx *ctx, const char *path, json_t *obj,
                              const char *key, int required)
{
    char p[256];
    snprintf(p, sizeof(p), "%s%s%s", path, path[0] ? "." : "", key);
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (required)
            cfg_error(ctx, p, "missing");
        return NULL;
    }
    if (!json_is_string(v)) {
        cfg_error(ctx, p, "must be a string");
        return NULL;
    }
    return json_string_value(v);
}

static int get_int(struct parse_ctx *ctx, const char *path, json_t *obj, const char *key,
                   int def, int lo, int hi)
{
    char p[256];
    snprintf(p, sizeof(p), "%s%s%s", path, path[0] ? "." : "", key);
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v)
        return def;
    if (!json_is_integer(v)) {
        cfg_error(ctx, p, "must be an integer");
        return def;
    }
    json_int_t n = json_integer_value(v);
    if (n < lo || n > hi) {
        cfg_error(ctx, p, "%lld is out of range %d..%d", (long long)n, lo, hi);
        return def;
    }
    return (int)n;
}

static int get_bool(struct parse_ctx *ctx, const char *path, json_t *obj, const char *key, int def)
{
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v)
        return def;
    if (!json_is_boolean(v)) {
        char p[256];
        snprintf(p, sizeof(p), "%s%s%s", path, path[0] ? "." : "", key);
        cfg_error(ctx, p, "must be true or false");
        return def;
    }
    return json_is_true(v);
}

static json_t *get_object(struct parse_ctx *ctx, const char *path, json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    if (v && !json_is_object(v)) {
        char p[256];
        snprintf(p, sizeof(p), "%s%s%s", path, path[0] ? "." : "", key);
        cfg_error(ctx, p, "must be an object");
        return NULL;
    }
    return v;
}

static int valid_name(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '_' || *s == '.'))
            return 0;
    return 1;
}

/* An array of strings; NULL when absent. */
static char **get_strings(struct parse_ctx *ctx, const char *path, json_t *obj, const char *key)
{
    json_t *arr = json_object_get(obj, key);
    if (!arr)
        return NULL;
    char p[256];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    if (!json_is_array(arr)) {
        cfg_error(ctx, p, "must be an array of strings");
        return NULL;
    }
    char **out = vm_calloc(json_array_size(arr) + 1, sizeof(char *));
    size_t i, n = 0;
    json_t *v;
    json_array_foreach(arr, i, v) {
        if (!json_is_string(v))
            cfg_error(ctx, p, "entry %zu must be a string", i);
        else
            out[n++] = vm_strdup(json_string_value(v));
    }
    return out;
}

static void free_strings(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

/* NULL when `file` can be opened for reading, else why not (strerror). */
static const char *unreadable(const char *file)
{
    FILE *f = fopen(file, "r");
    if (!f)
        return strerror(errno);
    fclose(f);
    return NULL;
}

/* A file holding a secret (private key, sasldb, keytab, password) must not be open to other
 * users: refuse the config rather than serve with a key anyone on the host may have copied.
 * Group access is allowed (a service group is the usual way to share it). */
static void check_private(struct parse_ctx *ctx, const char *path, const char *file)
{
    struct stat st;
    if (stat(file, &st) < 0 || !(st.st_mode & (S_IROTH | S_IWOTH)))
        return;
    cfg_error(ctx, path, "\"%s\" holds a secret but other users may read or write it "
              "(mode %04o): chmod o-rw it", file, (unsigned)(st.st_mode & 07777));
}

/* The admin endpoint's bearer token: the file's first line, read once at start. Only its owner
 * may read it (not even the group: nothing but the gateway needs it). */
static char *read_token(struct parse_ctx *ctx, const char *path, const char *file)
{
    struct stat st;
    FILE *f = fopen(file, "r");
    if (!f || fstat(fileno(f), &st) < 0) {
        cfg_error(ctx, path, "cannot read \"%s\": %s", file, strerror(errno));
        if (f)
            fclose(f);
        return NULL;
    }
    if (st.st_mode & (S_IRGRP | S_IWGRP | S_IROTH | S_IWOTH)) {
        cfg_error(ctx, path, "\"%s\" holds the admin token but its group or other users may "
                  "read or write it (mode %04o): chmod go-rw it", file,
                  (unsigned)(st.st_mode & 07777));
        fclose(f);
        return NULL;
    }
    char buf[1024];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    buf[strcspn(buf, "\r\n")] = '\0';
    size_t len = strlen(buf);
    int ok = len >= 16 && len < sizeof(buf) - 2;
    for (size_t i = 0; ok && i < len; i++)
        ok = buf[i] > ' ' && buf[i] < 0x7f; /* a header value: printable, no spaces */
    char *tok = ok ? vm_strdup(buf) : NULL;
    explicit_bzero(buf, sizeof(buf));
    if (!ok)
        cfg_error(ctx, path, "\"%s\" must hold one line of 16 to 1000 printable characters "
                  "without spaces (the token)", file);
    return tok;
}

static struct vm_tls_cfg *parse_tls(struct parse_ctx *ctx, const char *path, json_t *o, int server)
{
    static const char *const server_keys[] = {"cert", "key", "ca", "crl", "verify_client",
                                              "allowed_dn", NULL};
    static const char *const client_keys[] = {"cert", "key", "ca", "crl", "no_verify",
                                              "server_name", NULL};
    if (!json_is_object(o)) {
        cfg_error(ctx, path, "must be an object");
        return NULL;
    }
    check_keys(ctx, path, o, server ? server_keys : client_keys);
    struct vm_tls_cfg *t = vm_calloc(1, sizeof(*t));
    static const char *const files[] = {"cert", "key", "ca", "crl"};
    char **slots[] = {&t->cert, &t->key, &t->ca, &t->crl};
    for (int i = 0; i < 4; i++) {
        const char *f = get_string(ctx, path, o, files[i], server && i < 3);
        if (!f)
            continue;
        *slots[i] = vm_strdup(f);
        char p[160];
        snprintf(p, sizeof(p), "%s.%s", path, files[i]);
        const char *why = unreadable(f);
        if (why)
            cfg_error(ctx, p, "cannot read \"%s\": %s", f, why);
        else if (slots[i] == &t->key)
            check_private(ctx, p, f);
    }
    if (!t->cert != !t->key)
        cfg_error(ctx, path, "cert and key go together");
    if (server) {
        t->verify_client = VM_TLS_VERIFY_OPTIONAL;
        const char *v = get_string(ctx, path, o, "verify_client", 0);
        if (v) {
            if (!strcmp(v, "required"))
                t->verify_client = VM_TLS_VERIFY_REQUIRED;
            else if (!strcmp(v, "optional"))
                t->verify_client = VM_TLS_VERIFY_OPTIONAL;
            else if (!strcmp(v, "none"))
                t->verify_client = VM_TLS_VERIFY_NONE;
            else {
                char p[160];
                snprintf(p, sizeof(p), "%s.verify_client", path);
                cfg_error(ctx, p, "\"%s\" is not required, optional or none", v);
            }
        }
        t->allowed_dn = get_strings(ctx, path, o, "allowed_dn");
    } else {
        t->no_verify = get_bool(ctx, path, o, "no_verify", 0);
        const char *sn = get_string(ctx, path, o, "server_name", 0);
        if (sn)
            t->server_name = vm_strdup(sn);
        if (!t->ca && !t->no_verify)
            cfg_error(ctx, path, "needs \"ca\" to verify libvirtd (or \"no_verify\": true)");
    }
    return t;
}

static void tls_cfg_free(struct vm_tls_cfg *t)
{
    if (!t)
        return;
    free(t->cert);
    free(t->key);
    free(t->ca);
    free(t->crl);
    free(t->server_name);
    free_strings(t->allowed_dn);
    free(t);
}

/* A procedure of the REMOTE program by its table name, or NULL. */
static const struct vm_proc_info *proc_by_name(const char *name)
{
    for (size_t i = 0; i < vm_proc_table_len; i++)
        if (vm_proc_table[i].prog == VM_PROG_REMOTE && strcmp(vm_proc_table[i].name, name) == 0)
            return &vm_proc_table[i];
    return NULL;
}

/* The "cache" object at `path` into `c` (an upstream's; a template's calls it too). Only plain
 * calls of read-only verdict "yes" may be cached: anything else changes state, or answers
 * per connection. */
static void parse_cache(struct parse_ctx *ctx, const char *path, json_t *o, struct vm_cache_cfg *c)
{
    static const char *const keys[] = {"ttl_ms", "procedures", "readwrite", "max_entries",
                                       "max_bytes", NULL};
    char p[160];
    memset(c, 0, sizeof(*c));
    if (!o)
        return;
    if (!json_is_object(o)) {
        cfg_error(ctx, path, "must be an object");
        return;
    }
    check_keys(ctx, path, o, keys);
    c->enabled = 1;
    c->ttl_ms = get_int(ctx, path, o, "ttl_ms", 1000, 1, 3600000);
    c->readwrite = get_bool(ctx, path, o, "readwrite", 0);
    c->max_entries = get_int(ctx, path, o, "max_entries", 1024, 1, 1000000);
    c->max_bytes = get_int(ctx, path, o, "max_bytes", 16777216, 4096, 1073741824);
    snprintf(p, sizeof(p), "%s.procedures", path);
    json_t *arr = json_object_get(o, "procedures");
    if (!arr || !json_is_array(arr) || json_array_size(arr) == 0) {
        cfg_error(ctx, p, "must be a non-empty array of procedure names");
        return;
    }
    c->procs = vm_calloc(json_array_size(arr), sizeof(*c->procs));
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        const char *name = json_is_string(v) ? json_string_value(v) : NULL;
        const struct vm_proc_info *info = name ? proc_by_name(name) : NULL;
        if (!name)
            cfg_error(ctx, p, "entry %zu must be a string", i);
        else if (!info)
            cfg_error(ctx, p, "\"%s\" is not a procedure of the REMOTE program", name);
        else if (info->ro != VM_RO_YES || info->kind != VM_PK_CALL || info->fds_in ||
                 info->fds_out)
            cfg_error(ctx, p, "\"%s\" cannot be cached: only plain calls whose read-only "
                      "verdict is \"yes\" may be (it is %s)", name,
                      info->kind != VM_PK_CALL ? "not a plain call"
                      : info->ro == VM_RO_NO   ? "\"no\""
                      : info->ro == VM_RO_FLAGS ? "\"flags\""
                                                : "an FD-passing call");
        else
            c->procs[c->nprocs++] = info;
    }
}

/* A template's "match": a glob over upstream names, so the characters names may have plus
 * the glob's own; never '/', which would let it reach past the first path segment. */
static int valid_match(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!strchr("*?[]!-_.", *s) && !((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
                                          (*s >= '0' && *s <= '9')))
            return 0;
    return 1;
}

/* One element of "upstreams", or of "upstream_templates" (tmpl): a template has "match"
 * where an upstream has "name", and its URI is checked with {name} replaced by a sample, so
 * both take exactly the same keys otherwise. */
static void parse_upstream(struct parse_ctx *ctx, const char *arr, int i, json_t *o,
                           struct vm_upstream_cfg *u, int tmpl)
{
    static const char *const keys[] = {"name", "uri", "pool", "tls", "sasl", "cache", NULL};
    static const char *const tmpl_keys[] = {"match", "uri", "pool", "tls", "sasl", "cache", NULL};
    static const char *const sasl_keys[] = {"username", "password_file", NULL};
    static const char *const pool_keys[] = {"max_connections", "max_inflight", "idle_timeout_s",
                                            "connect_timeout_ms", "give_up_s", "max_streams",
                                            "reconnect_hold_ms", "coalesce", NULL};
    char path[64], p[96];
    snprintf(path, sizeof(path), "%s[%d]", arr, i);
    if (!json_is_object(o)) {
        cfg_error(ctx, path, "must be an object");
        return;
    }
    check_keys(ctx, path, o, tmpl ? tmpl_keys : keys);
    const char *name = get_string(ctx, path, o, tmpl ? "match" : "name", 1);
    if (name && !tmpl && !valid_name(name)) {
        snprintf(p, sizeof(p), "%s.name", path);
        cfg_error(ctx, p, "\"%s\" may only contain letters, digits, '-', '_' and '.'", name);
    }
    if (name && tmpl && !valid_match(name)) {
        snprintf(p, sizeof(p), "%s.match", path);
        cfg_error(ctx, p, "\"%s\" may only contain letters, digits, '-', '_', '.' and the "
                  "glob characters *?[]!", name);
    }
    u->name = vm_strdup(name ? name : "");
    const char *uri = get_string(ctx, path, o, "uri", 1);
    if (uri) {
        char err[256];
        u->uri_text = vm_strdup(uri);
        char *sample = uri_expand(uri, "example");
        if (uri_parse(sample, &u->uri, err, sizeof(err)) < 0) {
            snprintf(p, sizeof(p), "%s.uri", path);
            cfg_error(ctx, p, "%s", err);
        } else if (tmpl && !strstr(uri, "{name}")) {
            snprintf(p, sizeof(p), "%s.uri", path);
            cfg_error(ctx, p, "has no {name}: every upstream made from it would be the same");
        }
        free(sample);
    }
    json_t *tls = json_object_get(o, "tls");
    snprintf(p, sizeof(p), "%s.tls", path);
    if (tls)
        u->tls = parse_tls(ctx, p, tls, 0);
    if (uri && u->uri.transport == VM_TR_TLS && !u->tls)
        cfg_error(ctx, p, "a tls:// upstream needs a \"tls\" object (at least \"ca\")");
    if (u->tls && u->uri_text && u->uri.transport != VM_TR_TLS)
        cfg_error(ctx, p, "only applies to tls:// upstreams");
    snprintf(p, sizeof(p), "%s.sasl", path);
    json_t *us = get_object(ctx, path, o, "sasl");
    if (us) {
        check_keys(ctx, p, us, sasl_keys);
        const char *un = get_string(ctx, p, us, "username", 1);
        const char *pf = get_string(ctx, p, us, "password_file", 1);
        if (un)
            u->sasl_user = vm_strdup(un);
        if (pf) {
            u->sasl_password_file = vm_strdup(pf);
            char q[128];
            snprintf(q, sizeof(q), "%s.password_file", p);
            const char *why = unreadable(pf);
            if (why)
                cfg_error(ctx, q, "cannot read \"%s\": %s", pf, why);
            else
                check_private(ctx, q, pf);
        }
    }
    snprintf(p, sizeof(p), "%s.pool", path);
    json_t *pool = get_object(ctx, path, o, "pool");
    if (pool)
        check_keys(ctx, p, pool, pool_keys);
    u->pool.max_connections = get_int(ctx, p, pool, "max_connections", 4, 1, 256);
    u->pool.max_inflight = get_int(ctx, p, pool, "max_inflight", 4, 1, 1024);
    u->pool.idle_timeout_s = get_int(ctx, p, pool, "idle_timeout_s", 60, 0, 86400);
    u->pool.connect_timeout_ms = get_int(ctx, p, pool, "connect_timeout_ms", 10000, 100, 600000);
    u->pool.give_up_s = get_int(ctx, p, pool, "give_up_s", 60, 0, 86400);
    u->pool.max_streams = get_int(ctx, p, pool, "max_streams", 8, 1, 1024);
    u->pool.reconnect_hold_ms = get_int(ctx, p, pool, "reconnect_hold_ms", 10000, 0, 3600000);
    u->pool.coalesce = get_bool(ctx, p, pool, "coalesce", 1);
    snprintf(p, sizeof(p), "%s.cache", path);
    parse_cache(ctx, p, json_object_get(o, "cache"), &u->cache);
}

static int same(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

/* Two listeners with one name would be one in logs and policy; with one address, start-up
 * would fail on its own port. Say so at --check-config. */
static void check_listener_unique(struct parse_ctx *ctx, const struct vm_config *cfg, int i)
{
    const struct vm_listener_cfg *l = &cfg->listeners[i];
    for (int j = 0; j < i; j++) {
        const struct vm_listener_cfg *o = &cfg->listeners[j];
        char p[64];
        if (same(l->name, o->name)) {
            snprintf(p, sizeof(p), "listeners[%d].name", i);
            cfg_error(ctx, p, "\"%s\" is already used by listeners[%d]", l->name, j);
        }
        if (same(l->address, o->address) || same(l->unix_path, o->unix_path)) {
            snprintf(p, sizeof(p), "listeners[%d].%s", i, l->address ? "address" : "unix");
            cfg_error(ctx, p, "\"%s\" is already used by listeners[%d]",
                      l->address ? l->address : l->unix_path, j);
        }
    }
}

static void parse_listener(struct parse_ctx *ctx, int i, json_t *o, struct vm_listener_cfg *l)
{
    static const char *const keys[] = {"name", "address", "unix", "mode", "auth", "upstream",
                                       "readonly", "tls", "proxy_protocol", NULL};
    char path[64], p[96];
    snprintf(path, sizeof(path), "listeners[%d]", i);
    if (!json_is_object(o)) {
        cfg_error(ctx, path, "must be an object");
        return;
    }
    check_keys(ctx, path, o, keys);
    const char *name = get_string(ctx, path, o, "name", 0);
    char defname[32];
    snprintf(defname, sizeof(defname), "listener%d", i);
    l->name = vm_strdup(name ? name : defname);
    const char *addr = get_string(ctx, path, o, "address", 0);
    const char *unix_path = get_string(ctx, path, o, "unix", 0);
    if (!addr == !unix_path)
        cfg_error(ctx, path, "needs exactly one of \"address\" and \"unix\"");
    if (addr) {
        const char *colon = strrchr(addr, ':');
        if (!colon || colon == addr || !colon[1] || atoi(colon + 1) <= 0 || atoi(colon + 1) > 65535) {
            snprintf(p, sizeof(p), "%s.address", path);
            cfg_error(ctx, p, "\"%s\" is not host:port", addr);
        }
        l->address = vm_strdup(addr);
    }
    if (unix_path) {
        if (unix_path[0] != '/' || strlen(unix_path) >= 108) {
            snprintf(p, sizeof(p), "%s.unix", path);
            cfg_error(ctx, p, "must be an absolute path shorter than 108 bytes");
        }
        l->unix_path = vm_strdup(unix_path);
    }
    l->mode = 0660; /* owner and group: local users are not clients unless let in */
    const char *mode = get_string(ctx, path, o, "mode", 0);
    if (mode) {
        char *end;
        unsigned long m = strtoul(mode, &end, 8);
        if (*end || !*mode || m > 0777) {
            snprintf(p, sizeof(p), "%s.mode", path);
            cfg_error(ctx, p, "\"%s\" is not an octal file mode", mode);
        }
        l->mode = (unsigned)m;
    }
    json_t *tls = json_object_get(o, "tls");
    if (tls) {
        snprintf(p, sizeof(p), "%s.tls", path);
        l->tls = parse_tls(ctx, p, tls, 1);
        if (unix_path)
            cfg_error(ctx, p, "TLS listeners take an \"address\"");
    }
    const char *auth = get_string(ctx, path, o, "auth", 0);
    l->auth = VM_AUTH_NONE;
    snprintf(p, sizeof(p), "%s.auth", path);
    if (!auth || !strcmp(auth, "none")) {
        l->auth = VM_AUTH_NONE;
    } else if (!strcmp(auth, "sasl")) {
        l->auth = VM_AUTH_SASL;
    } else if (!strcmp(auth, "tls") || !strcmp(auth, "tls+sasl")) {
        l->auth = !strcmp(auth, "tls") ? VM_AUTH_TLS : VM_AUTH_TLS_SASL;
        if (!l->tls)
            cfg_error(ctx, p, "\"%s\" needs a \"tls\" object", auth);
        else
            l->tls->verify_client = VM_TLS_VERIFY_REQUIRED; /* the certificate is the proof */
    } else if (!strcmp(auth, "peer")) {
        l->auth = VM_AUTH_PEER;
        if (!unix_path)
            cfg_error(ctx, p, "\"peer\" needs a unix listener");
    } else {
        cfg_error(ctx, p, "unsupported auth \"%s\" (none, sasl, tls, tls+sasl, peer)", auth);
    }
    const char *up = get_string(ctx, path, o, "upstream", 0);
    if (up)
        l->upstream = vm_strdup(up);
    l->readonly = get_bool(ctx, path, o, "readonly", 0);
    l->proxy_protocol = get_bool(ctx, path, o, "proxy_protocol", 0);
    if (l->proxy_protocol && unix_path) {
        /* A unix client's identity is its credentials, which a header must not override. */
        snprintf(p, sizeof(p), "%s.proxy_protocol", path);
        cfg_error(ctx, p, "only TCP and TLS listeners take a PROXY protocol header");
    }
}

static int parse_cidr(const char *s, struct vm_rule *r)
{
    char addr[64];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    if (n >= sizeof(addr))
        return -1;
    memcpy(addr, s, n);
    addr[n] = '\0';
    int max;
    if (inet_pton(AF_INET, addr, r->net) == 1) {
        r->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, addr, r->net) == 1) {
        r->family = AF_INET6;
        max = 128;
    } else {
        return -1;
    }
    r->prefix = max;
    if (slash) {
        char *end;
        long p = strtol(slash + 1, &end, 10);
        if (*end || !slash[1] || p < 0 || p > max)
            return -1;
        r->prefix = (int)p;
    }
    r->has_cidr = 1;
    return 0;
}

/* A grant's "domains", "networks" or "storage_pools": globs on the object's name, "!glob" to
 * exclude. Stored NULL-terminated as given; NULL when absent (every object). */
static char **parse_names(struct parse_ctx *ctx, const char *path, json_t *o, const char *key)
{
    json_t *doms = json_object_get(o, key);
    if (!doms)
        return NULL;
    char p[160];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    if (!json_is_array(doms) || json_array_size(doms) == 0 || json_array_size(doms) > 256) {
        cfg_error(ctx, p, "must be an array of 1 to 256 name patterns (\"web-*\", \"!web-secret\")");
        return NULL;
    }
    char **out = vm_calloc(json_array_size(doms) + 1, sizeof(char *));
    size_t i, n = 0;
    json_t *v;
    json_array_foreach(doms, i, v) {
        const char *pat = json_is_string(v) ? json_string_value(v) : NULL;
        size_t len = pat ? strlen(pat) : 0;
        if (!pat || len == 0 || (pat[0] == '!' && len == 1) || len > 256) {
            cfg_error(ctx, p, "entry %zu must be a non-empty name pattern of at most 256 "
                              "characters", i);
            continue;
        }
        out[n++] = vm_strdup(pat);
    }
    return out;
}

/* The grant part of a rule (or of policy.default). */
static void parse_grant(struct parse_ctx *ctx, const char *path, json_t *o, struct vm_rule *r,
                        const struct vm_config *cfg)
{
    r->deny = get_bool(ctx, path, o, "deny", 0);
    r->readonly = get_bool(ctx, path, o, "readonly", 0);
    r->max_sessions = get_int(ctx, path, o, "max_sessions", 0, 0, 1000000);
    r->domains = parse_names(ctx, path, o, "domains");
    r->networks = parse_names(ctx, path, o, "networks");
    r->storage_pools = parse_names(ctx, path, o, "storage_pools");
    json_t *ups = json_object_get(o, "upstreams");
    char p[160];
    snprintf(p, sizeof(p), "%s.upstreams", path);
    if (!ups || (json_is_string(ups) && strcmp(json_string_value(ups), "*") == 0))
        return;
    if (!json_is_array(ups)) {
        cfg_error(ctx, p, "must be \"*\" or an array of upstream names");
        return;
    }
    /* NULL-terminated: names only, packed, so a bad entry leaves no hole before the end */
    r->upstreams = vm_calloc(json_array_size(ups) + 1, sizeof(char *));
    size_t i, n = 0;
    json_t *v;
    json_array_foreach(ups, i, v) {
        if (!json_is_string(v)) {
            cfg_error(ctx, p, "entry %zu must be a string", i);
            continue;
        }
        const char *name = json_string_value(v);
        if (!strpbrk(name, "*?[") && !config_upstream(cfg, name) &&
            !config_template(cfg, name))
            cfg_error(ctx, p, "no upstream is called \"%s\" and no upstream_templates[].match "
                      "matches it", name);
        r->upstreams[n++] = vm_strdup(name);
    }
}

static void parse_policy(struct parse_ctx *ctx, json_t *pol, struct vm_config *cfg)
{
    static const char *const keys[] = {"default", "rules", NULL};
    static const char *const rule_keys[] = {"match", "deny", "readonly", "upstreams",
                                            "max_sessions", "domains", "networks",
                                            "storage_pools", NULL};
    static const char *const grant_keys[] = {"deny", "readonly", "upstreams", "max_sessions",
                                             "domains", "networks", "storage_pools", NULL};
    static const char *const match_keys[] = {"listener", "source", "unix_uid", "unix_gid",
                                             "sasl_user", "tls_dn", NULL};
    cfg->policy_present = 1;
    check_keys(ctx, "policy", pol, keys);
    struct vm_rule *d = &cfg->default_rule;
    d->index = -1;
    d->uid = d->gid = -1;
    d->deny = 1;
    json_t *def = json_object_get(pol, "default");
    if (json_is_string(def) && strcmp(json_string_value(def), "allow") == 0) {
        d->deny = 0;
    } else if (json_is_object(def)) {
        check_keys(ctx, "policy.default", def, grant_keys);
        parse_grant(ctx, "policy.default", def, d, cfg);
    } else if (def && !(json_is_string(def) && strcmp(json_string_value(def), "deny") == 0)) {
        cfg_error(ctx, "policy.default", "must be \"deny\", \"allow\" or an object");
    }

    json_t *rules = json_object_get(pol, "rules");
    if (!rules)
        return;
    if (!json_is_array(rules)) {
        cfg_error(ctx, "policy.rules", "must be an array");
        return;
    }
    cfg->nrules = (int)json_array_size(rules);
    cfg->rules = vm_calloc((size_t)cfg->nrules + 1, sizeof(*cfg->rules));
    for (int i = 0; i < cfg->nrules; i++) {
        char path[64], p[96];
        snprintf(path, sizeof(path), "policy.rules[%d]", i);
        struct vm_rule *r = &cfg->rules[i];
        r->index = i;
        r->uid = r->gid = -1;
        json_t *o = json_array_get(rules, (size_t)i);
        if (!json_is_object(o)) {
            cfg_error(ctx, path, "must be an object");
            continue;
        }
        check_keys(ctx, path, o, rule_keys);
        parse_grant(ctx, path, o, r, cfg);
        snprintf(p, sizeof(p), "%s.match", path);
        json_t *m = get_object(ctx, path, o, "match");
        if (!m)
            continue;
        check_keys(ctx, p, m, match_keys);
        const char *s;
        if ((s = get_string(ctx, p, m, "listener", 0)))
            r->listener = vm_strdup(s);
        if ((s = get_string(ctx, p, m, "sasl_user", 0)))
            r->sasl_user = vm_strdup(s);
        if ((s = get_string(ctx, p, m, "tls_dn", 0)))
            r->tls_dn = vm_strdup(s);
        if ((s = get_string(ctx, p, m, "source", 0)) && parse_cidr(s, r) < 0) {
            char q[128];
            snprintf(q, sizeof(q), "%s.source", p);
            cfg_error(ctx, q, "\"%s\" is not an address or CIDR", s);
        }
        r->uid = get_int(ctx, p, m, "unix_uid", -1, 0, 0x7fffffff);
        r->gid = get_int(ctx, p, m, "unix_gid", -1, 0, 0x7fffffff);
    }
}

/* process.user / process.group: checked here so that --check-config catches a typo, resolved
 * again when privileges are dropped (privs.c). */
static void parse_process(struct parse_ctx *ctx, json_t *proc, struct vm_config *cfg)
{
    static const char *const keys[] = {"user", "group", NULL};
    if (!proc)
        return;
    check_keys(ctx, "process", proc, keys);
    const char *user = get_string(ctx, "process", proc, "user", 0);
    const char *group = get_string(ctx, "process", proc, "group", 0);
    if (user) {
        cfg->process_user = vm_strdup(user);
        if (!getpwnam(user))
            cfg_error(ctx, "process.user", "no user \"%s\"", user);
    }
    if (group) {
        cfg->process_group = vm_strdup(group);
        if (!user)
            cfg_error(ctx, "process.group", "needs process.user");
        else if (!getgrnam(group))
            cfg_error(ctx, "process.group", "no group \"%s\"", group);
    }
}

static struct vm_config *config_from_json(json_t *root, struct parse_ctx *ctx)
{
    static const char *const keys[] = {"listeners", "upstreams", "default_upstream", "limits",
                                       "keepalive", "log", "admin", "policy", "events", "sasl",
                                       "process", "routing", "upstream_templates", NULL};
    static const char *const routing_keys[] = {"strict", NULL};
    static const char *const sasl_keys[] = {"sasldb", "mechanisms", "allowed_users", "keytab",
                                            "service_host", "max_failures",
                                            "failure_window_s", NULL};
    static const char *const events_keys[] = {"max_queue_bytes", "max_per_session", NULL};
    static const char *const admin_keys[] = {"address", "unix", "token_file", NULL};
    static const char *const limit_keys[] = {"max_clients", "queue_timeout_ms",
                                             "max_client_requests", "max_unauthenticated",
                                             "max_unauthenticated_per_source",
                                             "auth_timeout_s", "drain_timeout_s",
                                             "max_upstreams", NULL};
    static const char *const ka_keys[] = {"interval_s", "count", NULL};
    static const char *const log_keys[] = {"level", "format", NULL};
    struct vm_config *cfg = vm_calloc(1, sizeof(*cfg));
    if (!json_is_object(root)) {
        cfg_error(ctx, "(root)", "must be an object");
        return cfg;
    }
    check_keys(ctx, "", root, keys);

    json_t *tpls = json_object_get(root, "upstream_templates");
    if (tpls && !json_is_array(tpls)) {
        cfg_error(ctx, "upstream_templates", "must be an array");
    } else if (tpls) {
        cfg->ntemplates = (int)json_array_size(tpls);
        cfg->templates = vm_calloc((size_t)cfg->ntemplates + 1, sizeof(*cfg->templates));
        for (int i = 0; i < cfg->ntemplates; i++)
            parse_upstream(ctx, "upstream_templates", i, json_array_get(tpls, (size_t)i),
                           &cfg->templates[i], 1);
    }

    /* With templates, named upstreams are optional: a fleet may be templates only. */
    json_t *ups = json_object_get(root, "upstreams");
    if (ups && !json_is_array(ups)) {
        cfg_error(ctx, "upstreams", "must be an array");
    } else if (json_array_size(ups) == 0 && cfg->ntemplates == 0) {
        cfg_error(ctx, "upstreams", "must be a non-empty array (or give upstream_templates)");
    } else {
        cfg->nupstreams = (int)json_array_size(ups);
        cfg->upstreams = vm_calloc((size_t)cfg->nupstreams + 1, sizeof(*cfg->upstreams));
        for (int i = 0; i < cfg->nupstreams; i++) {
            parse_upstream(ctx, "upstreams", i, json_array_get(ups, (size_t)i),
                           &cfg->upstreams[i], 0);
            for (int j = 0; j < i; j++)
                if (cfg->upstreams[i].name && cfg->upstreams[j].name &&
                    strcmp(cfg->upstreams[i].name, cfg->upstreams[j].name) == 0) {
                    char p[64];
                    snprintf(p, sizeof(p), "upstreams[%d].name", i);
                    cfg_error(ctx, p, "\"%s\" is already used by upstreams[%d]",
                              cfg->upstreams[i].name, j);
                }
        }
    }

    json_t *ls = json_object_get(root, "listeners");
    if (!json_is_array(ls) || json_array_size(ls) == 0) {
        cfg_error(ctx, "listeners", "must be a non-empty array");
    } else {
        cfg->nlisteners = (int)json_array_size(ls);
        cfg->listeners = vm_calloc((size_t)cfg->nlisteners, sizeof(*cfg->listeners));
        for (int i = 0; i < cfg->nlisteners; i++) {
            struct vm_listener_cfg *l = &cfg->listeners[i];
            parse_listener(ctx, i, json_array_get(ls, (size_t)i), l);
            check_listener_unique(ctx, cfg, i);
            if (l->upstream && !config_upstream(cfg, l->upstream)) {
                char p[64];
                snprintf(p, sizeof(p), "listeners[%d].upstream", i);
                cfg_error(ctx, p, "no upstream is called \"%s\"", l->upstream);
            }
        }
    }

    const char *def = get_string(ctx, "", root, "default_upstream", 0);
    if (def) {
        cfg->default_upstream = vm_strdup(def);
        if (!config_upstream(cfg, def))
            cfg_error(ctx, "default_upstream", "no upstream is called \"%s\"", def);
    }

    json_t *limits = get_object(ctx, "", root, "limits");
    if (limits)
        check_keys(ctx, "limits", limits, limit_keys);
    cfg->max_clients = get_int(ctx, "limits", limits, "max_clients", 10000, 1, 1000000);
    cfg->queue_timeout_ms = get_int(ctx, "limits", limits, "queue_timeout_ms", 30000, 1, 3600000);
    cfg->max_client_requests = get_int(ctx, "limits", limits, "max_client_requests", 16, 1, 4096);
    cfg->max_unauthenticated = get_int(ctx, "limits", limits, "max_unauthenticated", 20, 1,
                                       1000000);
    cfg->max_unauthenticated_per_source = get_int(ctx, "limits", limits,
                                                  "max_unauthenticated_per_source", 5, 1,
                                                  1000000);
    int per_source_given = limits && json_object_get(limits, "max_unauthenticated_per_source");
    if (!per_source_given && cfg->max_unauthenticated_per_source > cfg->max_unauthenticated)
        cfg->max_unauthenticated_per_source = cfg->max_unauthenticated; /* follows a lower cap */
    else if (cfg->max_unauthenticated_per_source > cfg->max_unauthenticated)
        cfg_error(ctx, "limits.max_unauthenticated_per_source",
                  "%d is more than limits.max_unauthenticated (%d)",
                  cfg->max_unauthenticated_per_source, cfg->max_unauthenticated);
    cfg->auth_timeout_s = get_int(ctx, "limits", limits, "auth_timeout_s", 30, 1, 3600);
    cfg->drain_timeout_s = get_int(ctx, "limits", limits, "drain_timeout_s", 30, 0, 3600);
    cfg->max_upstreams = get_int(ctx, "limits", limits, "max_upstreams", 1024, 1, 1000000);

    json_t *ka = get_object(ctx, "", root, "keepalive");
    if (ka)
        check_keys(ctx, "keepalive", ka, ka_keys);
    cfg->keepalive_interval_s = get_int(ctx, "keepalive", ka, "interval_s", 5, -1, 3600);
    if (cfg->keepalive_interval_s == 0)
        cfg_error(ctx, "keepalive.interval_s", "must be positive, or -1 to disable");
    cfg->keepalive_count = get_int(ctx, "keepalive", ka, "count", 5, 0, 100);

    json_t *log = get_object(ctx, "", root, "log");
    if (log)
        check_keys(ctx, "log", log, log_keys);
    cfg->log_level = VM_LOG_INFO;
    const char *lvl = log ? get_string(ctx, "log", log, "level", 0) : NULL;
    if (lvl) {
        cfg->log_level = vm_log_level_parse(lvl);
        if (cfg->log_level < 0) {
            cfg_error(ctx, "log.level", "\"%s\" is not one of error, warn, info, debug", lvl);
            cfg->log_level = VM_LOG_INFO;
        }
    }
    const char *fmt = log ? get_string(ctx, "log", log, "format", 0) : NULL;
    if (fmt) {
        if (strcmp(fmt, "json") == 0)
            cfg->log_json = 1;
        else if (strcmp(fmt, "text") != 0)
            cfg_error(ctx, "log.format", "\"%s\" is not text or json", fmt);
    }

    json_t *sasl = get_object(ctx, "", root, "sasl");
    int need_sasl = 0;
    for (int i = 0; i < cfg->nlisteners; i++)
        if (cfg->listeners[i].auth == VM_AUTH_SASL || cfg->listeners[i].auth == VM_AUTH_TLS_SASL)
            need_sasl = 1;
    if (need_sasl && !sasl)
        cfg_error(ctx, "sasl", "a listener uses SASL: give at least \"sasldb\" or \"keytab\"");
    if (sasl) {
        check_keys(ctx, "sasl", sasl, sasl_keys);
        struct vm_sasl_cfg *sc = vm_calloc(1, sizeof(*sc));
        cfg->sasl = sc;
        const char *db = get_string(ctx, "sasl", sasl, "sasldb", 0);
        if (db) {
            sc->sasldb = vm_strdup(db);
            const char *why = unreadable(db);
            if (why)
                cfg_error(ctx, "sasl.sasldb", "cannot read \"%s\": %s", db, why);
            else
                check_private(ctx, "sasl.sasldb", db);
        }
        const char *kt = get_string(ctx, "sasl", sasl, "keytab", 0);
        if (kt) {
            sc->keytab = vm_strdup(kt);
            const char *why = unreadable(kt);
            if (why)
                cfg_error(ctx, "sasl.keytab", "cannot read \"%s\": %s", kt, why);
            else
                check_private(ctx, "sasl.keytab", kt);
        }
        const char *sh = get_string(ctx, "sasl", sasl, "service_host", 0);
        if (sh)
            sc->service_host = vm_strdup(sh);
        char **mechs = get_strings(ctx, "sasl", sasl, "mechanisms");
        char buf[256] = "";
        for (char **m = mechs; m && *m; m++) {
            if (strcasecmp(*m, "scram-sha-256") && strcasecmp(*m, "digest-md5") &&
                strcasecmp(*m, "gssapi"))
                cfg_error(ctx, "sasl.mechanisms", "\"%s\" is not scram-sha-256, digest-md5 or "
                          "gssapi", *m);
            if (strlen(buf) + strlen(*m) + 2 < sizeof(buf)) {
                if (buf[0])
                    strcat(buf, " ");
                strcat(buf, *m);
            }
        }
        free_strings(mechs);
        /* DIGEST-MD5 only when asked for: cyrus-sasl leaks memory on every DIGEST-MD5
         * login with a security layer (docs/RELIABILITY.md). */
        sc->mechanisms = vm_strdup(buf[0] ? buf : "scram-sha-256 gssapi");
        sc->allowed_users = get_strings(ctx, "sasl", sasl, "allowed_users");
        sc->max_failures = get_int(ctx, "sasl", sasl, "max_failures", 5, 1, 100000);
        sc->failure_window_s = get_int(ctx, "sasl", sasl, "failure_window_s", 60, 1, 86400);
    }

    json_t *evs = get_object(ctx, "", root, "events");
    if (evs)
        check_keys(ctx, "events", evs, events_keys);
    cfg->event_queue_bytes = get_int(ctx, "events", evs, "max_queue_bytes", 8 << 20, 65536,
                                     1 << 30);
    cfg->event_max_per_session = get_int(ctx, "events", evs, "max_per_session", 256, 1, 65536);

    json_t *admin = get_object(ctx, "", root, "admin");
    if (admin) {
        check_keys(ctx, "admin", admin, admin_keys);
        const char *a = get_string(ctx, "admin", admin, "address", 0);
        const char *u = get_string(ctx, "admin", admin, "unix", 0);
        if (!a == !u)
            cfg_error(ctx, "admin", "needs exactly one of \"address\" and \"unix\"");
        if (a)
            cfg->admin_address = vm_strdup(a);
        if (u)
            cfg->admin_unix = vm_strdup(u);
        const char *t = get_string(ctx, "admin", admin, "token_file", 0);
        if (t)
            cfg->admin_token = read_token(ctx, "admin.token_file", t);
    }

    parse_process(ctx, get_object(ctx, "", root, "process"), cfg);

    json_t *routing = get_object(ctx, "", root, "routing");
    if (routing) {
        check_keys(ctx, "routing", routing, routing_keys);
        cfg->routing_strict = get_bool(ctx, "routing", routing, "strict", 0);
    }

    cfg->default_rule.index = -1;
    cfg->default_rule.uid = cfg->default_rule.gid = -1;
    json_t *pol = get_object(ctx, "", root, "policy");
    if (pol)
        parse_policy(ctx, pol, cfg);
    return cfg;
}

static struct vm_config *finish(json_t *root, struct parse_ctx *ctx)
{
    struct vm_config *cfg = config_from_json(root, ctx);
    json_decref(root);
    if (ctx->nerr) {
        config_free(cfg);
        return NULL;
    }
    return cfg;
}

struct vm_config *config_load(const char *path, FILE *errs)
{
    struct parse_ctx ctx = {errs, 0};
    json_error_t jerr;
    /* Opened here so a missing or unreadable file says so plainly (jansson would report it
     * as a parse error at line -1). */
    FILE *f = fopen(path, "r");
    if (!f) {
        if (errs)
            fprintf(errs, "cannot open config file %s: %s\n", path, strerror(errno));
        return NULL;
    }
    json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
    fclose(f);
    if (!root) {
        if (errs)
            fprintf(errs, "%s:%d:%d: %s\n", path, jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    return finish(root, &ctx);
}

struct vm_config *config_parse(const char *json, FILE *errs)
{
    struct parse_ctx ctx = {errs, 0};
    json_error_t jerr;
    json_t *root = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (errs)
            fprintf(errs, "(string):%d:%d: %s\n", jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    return finish(root, &ctx);
}

static void upstream_cfg_clear(struct vm_upstream_cfg *u)
{
    free(u->name);
    free(u->uri_text);
    uri_clear(&u->uri);
    tls_cfg_free(u->tls);
    free(u->sasl_user);
    free(u->sasl_password_file);
    free(u->cache.procs);
}

static void rule_clear(struct vm_rule *r)
{
    free(r->listener);
    free(r->sasl_user);
    free(r->tls_dn);
    if (r->upstreams)
        for (char **u = r->upstreams; *u; u++)
            free(*u);
    free(r->upstreams);
    char **lists[] = {r->domains, r->networks, r->storage_pools};
    for (size_t i = 0; i < sizeof(lists) / sizeof(lists[0]); i++) {
        if (lists[i])
            for (char **d = lists[i]; *d; d++)
                free(*d);
        free(lists[i]);
    }
}

void config_free(struct vm_config *cfg)
{
    if (!cfg)
        return;
    for (int i = 0; i < cfg->nrules; i++)
        rule_clear(&cfg->rules[i]);
    free(cfg->rules);
    rule_clear(&cfg->default_rule);
    if (cfg->sasl) {
        free(cfg->sasl->sasldb);
        free(cfg->sasl->mechanisms);
        free(cfg->sasl->keytab);
        free(cfg->sasl->service_host);
        free_strings(cfg->sasl->allowed_users);
        free(cfg->sasl);
    }
    free(cfg->admin_address);
    free(cfg->admin_unix);
    if (cfg->admin_token) {
        explicit_bzero(cfg->admin_token, strlen(cfg->admin_token));
        free(cfg->admin_token);
    }
    free(cfg->process_user);
    free(cfg->process_group);
    for (int i = 0; i < cfg->nlisteners; i++) {
        struct vm_listener_cfg *l = &cfg->listeners[i];
        free(l->name);
        free(l->address);
        free(l->unix_path);
        free(l->upstream);
        tls_cfg_free(l->tls);
    }
    free(cfg->listeners);
    for (int i = 0; i < cfg->nupstreams; i++)
        upstream_cfg_clear(&cfg->upstreams[i]);
    free(cfg->upstreams);
    for (int i = 0; i < cfg->ntemplates; i++)
        upstream_cfg_clear(&cfg->templates[i]);
    free(cfg->templates);
    free(cfg->default_upstream);
    free(cfg);
}
