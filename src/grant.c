/* Object grants: see grant.h. Everything here reads XDR from the front, as libvirtd does, and
 * refuses what it cannot read rather than forwarding it unchecked. */
#include "grant.h"

#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "proc.h"
#include "util.h"
#include "xmlname.h"

enum {
    VIR_ERR_NO_DOMAIN = 42,
    VIR_ERR_NO_NETWORK = 43,
    VIR_ERR_NO_STORAGE_POOL = 49,
    VIR_ERR_NO_STORAGE_VOL = 50,
    VIR_FROM_QEMU = 10,
    VIR_FROM_TEST = 12,
    VIR_FROM_LXC = 17,
    VIR_FROM_STORAGE = 18,
    VIR_FROM_NETWORK = 19,
    VIR_FROM_LIBXL = 41,
    VIR_FROM_CH = 72,
    VIR_FROM_BHYVE = 57,
    VIR_FROM_VBOX = 25,
    VIR_FROM_OPENVZ = 14,
    VIR_FROM_ESX = 28,
    VIR_FROM_HYPERV = 43,
    VIR_FROM_VMWARE = 39,
};
#define UUID_LEN 16
#define LIST_MAX 16384 /* the protocol's largest object and name lists */

/* What differs between the families. */
struct family {
    const char *noun;  /* in "no %s with matching ..." */
    const char *title; /* "Domain not found" */
    int code;          /* VIR_ERR_NO_* */
    const char *root;  /* root element of its XML definition */
    int has_id;        /* the handle carries an int id after the UUID (domains) */
    int by_name;       /* handles are checked by UUID and name (the test driver finds
                        * networks and pools by name, the others by UUID) */
    uint32_t active, inactive; /* the LIST_ALL flags for running / defined-only */
    int32_t list_all;          /* its LIST_ALL procedure */
};

static const struct family families[VM_OBJ_FAMILIES] = {
    [VM_OBJ_DOMAIN] = {"domain", "Domain not found", VIR_ERR_NO_DOMAIN, "domain", 1, 0, 1, 2,
                       VM_PROC_CONNECT_LIST_ALL_DOMAINS},
    [VM_OBJ_NETWORK] = {"network", "Network not found", VIR_ERR_NO_NETWORK, "network", 0, 1, 2,
                        1, VM_PROC_CONNECT_LIST_ALL_NETWORKS},
    [VM_OBJ_STORAGE_POOL] = {"storage pool", "Storage pool not found", VIR_ERR_NO_STORAGE_POOL,
                             "pool", 0, 1, 2, 1, VM_PROC_CONNECT_LIST_ALL_STORAGE_POOLS},
};

/* A handle the session was shown. */
struct seen {
    uint8_t uuid[UUID_LEN];
    char *name; /* by_name families only */
    int used;
};

struct fam_grant {
    char *const *patterns; /* NULL: the family is not limited */
    int err_domain;        /* the error domain its driver reports "not found" under */
    int test;              /* the test driver: its own wordings */
    struct seen *seen;     /* open addressing; cap a power of two or 0 */
    size_t cap, count;
};

struct vm_grant {
    struct fam_grant f[VM_OBJ_FAMILIES];
};

int grant_allows(char *const *patterns, const char *name)
{
    if (!patterns)
        return 1;
    int granted = 0;
    for (char *const *p = patterns; *p; p++) {
        if ((*p)[0] == '!') {
            if (fnmatch(*p + 1, name, 0) == 0)
                return 0;
        } else if (!granted && fnmatch(*p, name, 0) == 0) {
            granted = 1;
        }
    }
    return granted;
}

static int driver_domain(const char *opened_name)
{
    static const struct {
        const char *driver;
        int domain;
    } drivers[] = {
        {"test", VIR_FROM_TEST},     {"qemu", VIR_FROM_QEMU},     {"lxc", VIR_FROM_LXC},
        {"xen", VIR_FROM_LIBXL},     {"ch", VIR_FROM_CH},         {"bhyve", VIR_FROM_BHYVE},
        {"vbox", VIR_FROM_VBOX},     {"openvz", VIR_FROM_OPENVZ}, {"esx", VIR_FROM_ESX},
        {"hyperv", VIR_FROM_HYPERV}, {"vmwareplayer", VIR_FROM_VMWARE},
    };
    size_t n = opened_name ? strcspn(opened_name, ":+") : 0;
    for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
        if (strlen(drivers[i].driver) == n && strncmp(drivers[i].driver, opened_name, n) == 0)
            return drivers[i].domain;
    return VIR_FROM_QEMU;
}

struct vm_grant *grant_new(char *const *domains, char *const *networks,
                           char *const *storage_pools, const char *opened_name)
{
    if (!domains && !networks && !storage_pools)
        return NULL;
    struct vm_grant *g = vm_calloc(1, sizeof(*g));
    int drv = driver_domain(opened_name);
    int test = drv == VIR_FROM_TEST;
    g->f[VM_OBJ_DOMAIN].patterns = domains;
    g->f[VM_OBJ_DOMAIN].err_domain = drv;
    g->f[VM_OBJ_NETWORK].patterns = networks;
    g->f[VM_OBJ_NETWORK].err_domain = test ? VIR_FROM_TEST : VIR_FROM_NETWORK;
    g->f[VM_OBJ_STORAGE_POOL].patterns = storage_pools;
    g->f[VM_OBJ_STORAGE_POOL].err_domain = test ? VIR_FROM_TEST : VIR_FROM_STORAGE;
    for (int i = 0; i < VM_OBJ_FAMILIES; i++)
        g->f[i].test = test;
    return g;
}

static void seen_clear(struct fam_grant *f)
{
    for (size_t i = 0; i < f->cap; i++)
        free(f->seen[i].name);
    free(f->seen);
}

void grant_free(struct vm_grant *g)
{
    if (!g)
        return;
    for (int i = 0; i < VM_OBJ_FAMILIES; i++)
        seen_clear(&g->f[i]);
    free(g);
}

/* ---- the handles this session was shown: an open-addressing set ---- */

static size_t uuid_slot(const struct fam_grant *f, const uint8_t *uuid)
{
    /* UUIDs are random enough: their first bytes are the hash */
    uint64_t h = 0;
    memcpy(&h, uuid, sizeof(h));
    h ^= h >> 29;
    return (size_t)(h * 0x9e3779b97f4a7c15ull) & (f->cap - 1);
}

/* Was (uuid, name) shown? name: NULL for families checked by UUID alone. */
static int seen_has(const struct fam_grant *f, const uint8_t *uuid, const char *name)
{
    if (!f->cap)
        return 0;
    for (size_t i = uuid_slot(f, uuid);; i = (i + 1) & (f->cap - 1)) {
        const struct seen *e = &f->seen[i];
        if (!e->used)
            return 0;
        if (memcmp(e->uuid, uuid, UUID_LEN) == 0 &&
            (!name || (e->name && strcmp(e->name, name) == 0)))
            return 1;
    }
}

static void seen_put(struct fam_grant *f, const uint8_t *uuid, char *name)
{
    size_t i = uuid_slot(f, uuid);
    while (f->seen[i].used)
        i = (i + 1) & (f->cap - 1);
    memcpy(f->seen[i].uuid, uuid, UUID_LEN);
    f->seen[i].name = name;
    f->seen[i].used = 1;
    f->count++;
}

static void seen_add(struct fam_grant *f, const uint8_t *uuid, const char *name)
{
    if (seen_has(f, uuid, name) || f->count >= VM_GRANT_SEEN_MAX)
        return;
    if ((f->count + 1) * 2 > f->cap) {
        struct fam_grant old = *f;
        f->cap = old.cap ? old.cap * 2 : 64;
        f->seen = vm_calloc(f->cap, sizeof(*f->seen));
        f->count = 0;
        for (size_t i = 0; i < old.cap; i++)
            if (old.seen[i].used)
                seen_put(f, old.seen[i].uuid, old.seen[i].name);
        free(old.seen);
    }
    seen_put(f, uuid, name ? vm_strdup(name) : NULL);
}

/* ---- reading handles ---- */

/* A domain, network or pool handle; name is malloc'd. */
struct handle {
    char *name;
    uint8_t uuid[UUID_LEN];
    int32_t id;
};

static void read_raw(struct xrd *r, void *out, size_t n)
{
    if (r->err || r->len - r->off < n) {
        r->err = 1;
        memset(out, 0, n);
        return;
    }
    memcpy(out, r->p + r->off, n);
    r->off += n;
}

static int read_handle(struct xrd *r, const struct family *fam, struct handle *h)
{
    h->name = xr_string(r, VM_STRING_MAX);
    read_raw(r, h->uuid, UUID_LEN);
    h->id = fam->has_id ? xr_i32(r) : -1;
    if (r->err) {
        free(h->name);
        h->name = NULL;
        return -1;
    }
    return 0;
}

/* A volume {string pool; string name; string key}: its pool's name, malloc'd (the key too
 * when asked for). */
static char *read_vol_pool(struct xrd *r, char **key)
{
    char *pool = xr_string(r, VM_STRING_MAX);
    xr_skip_string(r);
    char *k = xr_string(r, VM_STRING_MAX);
    if (r->err) {
        free(pool);
        free(k);
        return NULL;
    }
    if (key)
        *key = k;
    else
        free(k);
    return pool;
}

static void uuid_str(const uint8_t *u, char out[37])
{
    snprintf(out, 37,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
             u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
             u[15]);
}

/* ---- errors, worded as the driver words a missing object ---- */

/* "<title>: <detail>" with str1 "<title>: %s" and str2 the detail; detail NULL: the bare
 * title (the test driver's domain lookups). */
static void not_found(struct vm_grant_error *e, int code, int domain, const char *title,
                      const char *detail)
{
    e->code = code;
    e->domain = domain;
    if (detail) {
        snprintf(e->str1, sizeof(e->str1), "%s: %%s", title);
        snprintf(e->str2, sizeof(e->str2), "%s", detail);
        snprintf(e->message, sizeof(e->message), "%s: %s", title, detail);
    } else {
        snprintf(e->str1, sizeof(e->str1), "%s", title);
        e->str2[0] = '\0';
        snprintf(e->message, sizeof(e->message), "%s", title);
    }
}

/* A call naming an object by a handle the driver cannot find. */
static void not_found_handle(const struct fam_grant *f, const struct family *fam,
                             const struct handle *h, struct vm_grant_error *e)
{
    char u[37], detail[sizeof(e->str2)];
    uuid_str(h->uuid, u);
    if (fam->by_name && f->test)
        snprintf(detail, sizeof(detail), "no %s with matching name '%.400s'", fam->noun,
                 h->name);
    else
        snprintf(detail, sizeof(detail), "no %s with matching uuid '%s' (%.400s)", fam->noun, u,
                 h->name);
    not_found(e, fam->code, f->err_domain, fam->title, detail);
}

/* A lookup found nothing: `what` is "name 'x'", "uuid 'u'", "id 3", "target path 'p'". */
static void not_found_lookup(const struct fam_grant *f, const struct family *fam,
                             const char *what, struct vm_grant_error *e)
{
    if (fam->has_id && f->test) {
        not_found(e, fam->code, f->err_domain, fam->title, NULL);
        return;
    }
    char detail[sizeof(e->str2)];
    snprintf(detail, sizeof(detail), "no %s with matching %s", fam->noun, what);
    not_found(e, fam->code, f->err_domain, fam->title, detail);
}

/* A volume whose pool the grant excludes: its pool "does not exist". */
static void not_found_vol_pool(const struct fam_grant *f, const char *pool,
                               struct vm_grant_error *e)
{
    char detail[sizeof(e->str2)];
    snprintf(detail, sizeof(detail), "no storage pool with matching name '%.400s'", pool);
    not_found(e, VIR_ERR_NO_STORAGE_POOL, f->err_domain, "Storage pool not found", detail);
}

static void access_error(struct vm_grant_error *e, const char *text)
{
    e->code = VIR_ERR_ACCESS_DENIED;
    e->domain = VIR_FROM_ACCESS;
    e->str1[0] = e->str2[0] = '\0';
    snprintf(e->message, sizeof(e->message), "access denied: virtmux: %s", text);
}

static void outside_grant(struct vm_grant_error *e, const struct family *fam, const char *name)
{
    char text[400];
    snprintf(text, sizeof(text), "%s '%.300s' is outside this client's grant", fam->noun, name);
    access_error(e, text);
}

static void decode_error(struct vm_grant_error *e)
{
    e->code = VIR_ERR_RPC;
    e->domain = VIR_FROM_RPC;
    e->str1[0] = e->str2[0] = '\0';
    snprintf(e->message, sizeof(e->message), "Unable to decode message payload");
}

/* ---- calls ---- */

static const uint8_t *payload_of(struct evbuffer *pkt, size_t *n)
{
    size_t len = evbuffer_get_length(pkt);
    const uint8_t *p = evbuffer_pullup(pkt, -1);
    *n = len - VM_HDR_LEN;
    return p + VM_HDR_LEN;
}

/* Replace the call in `pkt` by the family's LIST_ALL(need_results = 1, flags). */
static void rewrite_list_all(struct evbuffer *pkt, const struct family *fam, uint32_t flags)
{
    struct vm_hdr h;
    wire_hdr_peek(pkt, &h);
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, 1);
    xb_u32(&b, flags);
    evbuffer_drain(pkt, evbuffer_get_length(pkt));
    wire_put_packet(pkt, h.prog, fam->list_all, h.type, h.serial, h.status, b.p, b.len);
    xb_free(&b);
}

/* A handle in the arguments: only one this session was shown. */
static enum vm_grant_verdict check_handle(struct fam_grant *f, const struct family *fam,
                                          struct xrd *r, struct vm_grant_error *err)
{
    struct handle h;
    if (read_handle(r, fam, &h) < 0) {
        decode_error(err);
        return VM_GRANT_REFUSED;
    }
    enum vm_grant_verdict v = VM_GRANT_PASS;
    if (!seen_has(f, h.uuid, fam->by_name ? h.name : NULL)) {
        not_found_handle(f, fam, &h, err);
        v = VM_GRANT_REFUSED;
    }
    free(h.name);
    return v;
}

/* A volume in the arguments: its pool, by name. */
static enum vm_grant_verdict check_vol(struct fam_grant *f, struct xrd *r,
                                       struct vm_grant_error *err)
{
    char *pool = read_vol_pool(r, NULL);
    if (!pool) {
        decode_error(err);
        return VM_GRANT_REFUSED;
    }
    enum vm_grant_verdict v = VM_GRANT_PASS;
    if (!grant_allows(f->patterns, pool)) {
        not_found_vol_pool(f, pool, err);
        v = VM_GRANT_REFUSED;
    }
    free(pool);
    return v;
}

/* Read a string argument for the wording of a lookup answered later. */
static char *read_note(struct xrd *r)
{
    return xr_string(r, VM_STRING_MAX);
}

static enum vm_grant_verdict check_family(struct fam_grant *f, const struct family *fam,
                                          const struct vm_proc_info *info, enum vm_obj_how how,
                                          struct evbuffer *pkt, struct vm_grant_memo *memo,
                                          struct vm_grant_error *err)
{
    size_t n;
    const uint8_t *args = payload_of(pkt, &n);
    struct xrd r;
    xr_init(&r, args, n);
    switch (how) {
    case VM_OBJ_NONE:
    case VM_OBJ_EVENT:
    case VM_OBJ_EVENT_CB:
        return VM_GRANT_PASS;
    case VM_OBJ_ARG:
        return check_handle(f, fam, &r, err);
    case VM_OBJ_IN_ARG:
        xr_skip_string(&r);
        return check_handle(f, fam, &r, err);
    case VM_OBJ_VOL:
        return check_vol(f, &r, err);
    case VM_OBJ_LOOKUP_VOL: {
        enum vm_grant_verdict v = check_vol(f, &r, err);
        return v == VM_GRANT_PASS ? VM_GRANT_FILTER : v;
    }
    case VM_OBJ_CLONE: {
        enum vm_grant_verdict v = check_handle(f, fam, &r, err);
        if (v != VM_GRANT_PASS)
            return v;
        xr_skip_string(&r); /* the new volume's XML */
        return check_vol(f, &r, err);
    }
    case VM_OBJ_RENAME: {
        enum vm_grant_verdict v = check_handle(f, fam, &r, err);
        if (v != VM_GRANT_PASS)
            return v;
        int present;
        char *to = xr_opt_string(&r, VM_STRING_MAX, &present);
        if (r.err) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        if (present && !grant_allows(f->patterns, to)) {
            outside_grant(err, fam, to);
            v = VM_GRANT_REFUSED;
        }
        free(to);
        return v;
    }
    case VM_OBJ_XML: {
        uint32_t len = xr_u32(&r);
        if (r.err || len > VM_STRING_MAX || r.len - r.off < len) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        char *name = xmlname_of((const char *)r.p + r.off, len, fam->root);
        if (!name) {
            char text[100];
            snprintf(text, sizeof(text), "cannot read the %s name in the XML", fam->noun);
            access_error(err, text);
            return VM_GRANT_REFUSED;
        }
        enum vm_grant_verdict v = VM_GRANT_FILTER;
        if (!grant_allows(f->patterns, name)) {
            outside_grant(err, fam, name);
            v = VM_GRANT_REFUSED;
        }
        free(name);
        return v;
    }
    case VM_OBJ_LOOKUP_NAME: {
        char *name = xr_string(&r, VM_STRING_MAX);
        if (!name) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        enum vm_grant_verdict v = VM_GRANT_FILTER;
        if (!grant_allows(f->patterns, name)) {
            char what[320];
            snprintf(what, sizeof(what), "name '%.300s'", name);
            not_found_lookup(f, fam, what, err);
            v = VM_GRANT_REFUSED;
        }
        free(name);
        return v;
    }
    case VM_OBJ_LOOKUP:
        if (info->proc == VM_PROC_STORAGE_POOL_LOOKUP_BY_TARGET_PATH) {
            memo->note = read_note(&r);
            if (!memo->note) {
                decode_error(err);
                return VM_GRANT_REFUSED;
            }
        }
        return VM_GRANT_FILTER;
    case VM_OBJ_VOL_LOOKUP:
        memo->note = read_note(&r);
        if (!memo->note) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        return VM_GRANT_FILTER;
    case VM_OBJ_STATS_ALL:
        return VM_GRANT_FILTER;
    case VM_OBJ_LIST_ALL: {
        int32_t need = xr_i32(&r);
        if (r.err || r.len - r.off < 4) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        memo->aux = need != 0;
        if (!need) {
            /* the client wants only the count: ask for the list, count what it may see */
            uint8_t *w = (uint8_t *)args;
            w[3] = 1;
        }
        return VM_GRANT_FILTER;
    }
    case VM_OBJ_LIST_IDS:
    case VM_OBJ_LIST_ACTIVE:
    case VM_OBJ_LIST_DEFINED: {
        int32_t max = xr_i32(&r);
        if (r.err || max < 0 || max > LIST_MAX) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        memo->aux = (uint32_t)max;
        rewrite_list_all(pkt, fam, how == VM_OBJ_LIST_DEFINED ? fam->inactive : fam->active);
        return VM_GRANT_FILTER;
    }
    case VM_OBJ_NUM_ACTIVE:
    case VM_OBJ_NUM_DEFINED:
        rewrite_list_all(pkt, fam, how == VM_OBJ_NUM_ACTIVE ? fam->active : fam->inactive);
        return VM_GRANT_FILTER;
    case VM_OBJ_REFUSE: {
        char text[200];
        snprintf(text, sizeof(text), "%s is not available to clients limited to some %ss",
                 info->name, fam->noun);
        access_error(err, text);
        return VM_GRANT_REFUSED;
    }
    }
    return VM_GRANT_PASS;
}

enum vm_grant_verdict grant_check_call(struct vm_grant *g, const struct vm_proc_info *info,
                                       struct evbuffer *pkt, struct vm_grant_memo *memo,
                                       struct vm_grant_error *err)
{
    memo->aux = 0;
    memo->note = NULL;
    if (!info)
        return VM_GRANT_PASS;
    enum vm_grant_verdict v = VM_GRANT_PASS;
    for (int i = 0; i < VM_OBJ_FAMILIES && v != VM_GRANT_REFUSED; i++) {
        if (!g->f[i].patterns || info->objects[i] == VM_OBJ_NONE)
            continue;
        enum vm_grant_verdict fv =
            check_family(&g->f[i], &families[i], info, info->objects[i], pkt, memo, err);
        if (fv != VM_GRANT_PASS)
            v = fv;
    }
    if (v == VM_GRANT_REFUSED) {
        free(memo->note);
        memo->note = NULL;
    }
    return v;
}

/* ---- replies ---- */

static void put_error(struct evbuffer *out, const struct vm_hdr *call,
                      const struct vm_grant_error *e)
{
    wire_put_error_full(out, call, e->code, e->domain, e->message, e->str1[0] ? e->str1 : NULL,
                        e->str2[0] ? e->str2 : NULL);
}

/* Skip one remote_typed_param: {string field; int type; value by type}. */
static void skip_typed_param(struct xrd *r)
{
    xr_skip_string(r);
    int32_t type = xr_i32(r);
    switch (type) {
    case 1: /* int */
    case 2: /* uint */
    case 6: /* boolean */
        (void)xr_u32(r);
        break;
    case 3: /* llong */
    case 4: /* ullong */
    case 5: /* double */
        (void)xr_u32(r);
        (void)xr_u32(r);
        break;
    case 7: /* string */
        xr_skip_string(r);
        break;
    default:
        r->err = 1;
    }
}

/* One handle (or stats record) of a list: kept or not, and where its bytes are. */
struct item {
    size_t start, end;
    struct handle h;
    int keep;
};

/* Read `count` then the items of a list of handles (stats: records with params). */
static struct item *read_items(const struct fam_grant *f, const struct family *fam,
                               struct xrd *r, int stats, uint32_t *count)
{
    uint32_t n = xr_u32(r);
    size_t min = 4 + UUID_LEN + (fam->has_id ? 4 : 0);
    if (r->err || n > LIST_MAX || n > (r->len - r->off) / min) {
        r->err = 1;
        *count = 0;
        return NULL;
    }
    struct item *items = vm_calloc(n ? n : 1, sizeof(*items));
    for (uint32_t i = 0; i < n && !r->err; i++) {
        items[i].start = r->off;
        if (read_handle(r, fam, &items[i].h) < 0)
            break;
        if (stats) {
            uint32_t np = xr_u32(r);
            if (np > (r->len - r->off) / 12)
                r->err = 1;
            for (uint32_t k = 0; k < np && !r->err; k++)
                skip_typed_param(r);
        }
        items[i].end = r->off;
        items[i].keep = grant_allows(f->patterns, items[i].h.name);
    }
    *count = n;
    return items;
}

static void free_items(struct item *items, uint32_t n)
{
    for (uint32_t i = 0; items && i < n; i++)
        free(items[i].h.name);
    free(items);
}

static void remember(struct fam_grant *f, const struct family *fam, const struct handle *h)
{
    seen_add(f, h->uuid, fam->by_name ? h->name : NULL);
}

/* The filtered payload of a reply into b; 0, or -1 with *e to answer instead. */
static int filter_payload(struct fam_grant *f, const struct family *fam, enum vm_obj_how how,
                          const struct vm_grant_memo *memo, const struct vm_hdr *call,
                          const uint8_t *payload, size_t n, struct xbuf *b,
                          struct vm_grant_error *e)
{
    struct xrd r;
    xr_init(&r, payload, n);
    switch (how) {
    case VM_OBJ_XML:
    case VM_OBJ_LOOKUP_NAME:
    case VM_OBJ_LOOKUP:
    case VM_OBJ_LOOKUP_VOL: {
        struct handle h;
        if (read_handle(&r, fam, &h) < 0)
            break;
        if (grant_allows(f->patterns, h.name)) {
            remember(f, fam, &h);
            xb_bytes(b, payload, n);
            free(h.name);
            return 0;
        }
        char what[320], u[37];
        uuid_str(h.uuid, u);
        if (call->proc == VM_PROC_DOMAIN_LOOKUP_BY_ID)
            snprintf(what, sizeof(what), "id %d", (int)h.id);
        else if (memo->note)
            snprintf(what, sizeof(what), "target path '%.300s'", memo->note);
        else if (how == VM_OBJ_LOOKUP)
            snprintf(what, sizeof(what), "uuid '%s'", u);
        else
            snprintf(what, sizeof(what), "name '%.300s'", h.name);
        not_found_lookup(f, fam, what, e);
        free(h.name);
        return -1;
    }
    case VM_OBJ_VOL_LOOKUP: {
        char *key = NULL;
        char *pool = read_vol_pool(&r, &key);
        if (!pool)
            break;
        int ok = grant_allows(f->patterns, pool);
        free(pool);
        free(key);
        if (ok) {
            xb_bytes(b, payload, n);
            return 0;
        }
        char detail[sizeof(e->str2)];
        snprintf(detail, sizeof(detail), "no storage vol with matching %s '%.400s'",
                 call->proc == VM_PROC_STORAGE_VOL_LOOKUP_BY_KEY ? "key" : "path",
                 memo->note ? memo->note : "");
        not_found(e, VIR_ERR_NO_STORAGE_VOL, f->err_domain, "Storage volume not found", detail);
        return -1;
    }
    case VM_OBJ_LIST_ALL:
    case VM_OBJ_STATS_ALL: {
        uint32_t count = 0, kept = 0;
        struct item *items = read_items(f, fam, &r, how == VM_OBJ_STATS_ALL, &count);
        if (how == VM_OBJ_LIST_ALL)
            (void)xr_u32(&r); /* ret: the upstream's count, replaced below */
        if (!r.err) {
            for (uint32_t i = 0; i < count; i++)
                kept += items[i].keep;
            int list = how == VM_OBJ_STATS_ALL || memo->aux;
            xb_u32(b, list ? kept : 0);
            for (uint32_t i = 0; list && i < count; i++) {
                if (!items[i].keep)
                    continue;
                remember(f, fam, &items[i].h);
                xb_bytes(b, payload + items[i].start, items[i].end - items[i].start);
            }
            if (how == VM_OBJ_LIST_ALL)
                xb_u32(b, kept);
        }
        free_items(items, count);
        break;
    }
    case VM_OBJ_LIST_IDS:
    case VM_OBJ_LIST_ACTIVE:
    case VM_OBJ_LIST_DEFINED:
    case VM_OBJ_NUM_ACTIVE:
    case VM_OBJ_NUM_DEFINED: {
        uint32_t count = 0, kept = 0;
        struct item *items = read_items(f, fam, &r, 0, &count);
        (void)xr_u32(&r);
        if (!r.err) {
            for (uint32_t i = 0; i < count; i++)
                kept += items[i].keep;
            if (how == VM_OBJ_NUM_ACTIVE || how == VM_OBJ_NUM_DEFINED) {
                xb_i32(b, (int32_t)kept);
            } else {
                uint32_t k = kept < memo->aux ? kept : memo->aux;
                xb_u32(b, k);
                for (uint32_t i = 0, w = 0; i < count && w < k; i++) {
                    if (!items[i].keep)
                        continue;
                    if (how == VM_OBJ_LIST_IDS)
                        xb_i32(b, items[i].h.id);
                    else
                        xb_string(b, items[i].h.name);
                    w++;
                }
            }
        }
        free_items(items, count);
        break;
    }
    default:
        xb_bytes(b, payload, n);
        return 0;
    }
    if (r.err) {
        decode_error(e);
        return -1;
    }
    return 0;
}

static int filters(enum vm_obj_how how)
{
    switch (how) {
    case VM_OBJ_XML:
    case VM_OBJ_LOOKUP_NAME:
    case VM_OBJ_LOOKUP:
    case VM_OBJ_LOOKUP_VOL:
    case VM_OBJ_VOL_LOOKUP:
    case VM_OBJ_LIST_ALL:
    case VM_OBJ_STATS_ALL:
    case VM_OBJ_LIST_IDS:
    case VM_OBJ_LIST_ACTIVE:
    case VM_OBJ_LIST_DEFINED:
    case VM_OBJ_NUM_ACTIVE:
    case VM_OBJ_NUM_DEFINED:
        return 1;
    default:
        return 0;
    }
}

void grant_filter_reply(struct vm_grant *g, const struct vm_proc_info *info,
                        const struct vm_grant_memo *memo, const struct vm_hdr *call,
                        struct evbuffer *reply, struct evbuffer *out)
{
    struct vm_hdr h;
    wire_hdr_peek(reply, &h);
    size_t n;
    const uint8_t *payload = payload_of(reply, &n);
    int fi = -1;
    for (int i = 0; info && i < VM_OBJ_FAMILIES && fi < 0; i++)
        if (g->f[i].patterns && filters(info->objects[i]))
            fi = i;
    if (h.status != VM_STATUS_OK || fi < 0) {
        /* an error passes as it is, answered as the client's procedure */
        wire_put_packet(out, call->prog, call->proc, VM_REPLY, call->serial, h.status, payload,
                        n);
        evbuffer_drain(reply, evbuffer_get_length(reply));
        return;
    }
    struct xbuf b;
    xb_init(&b);
    struct vm_grant_error e;
    if (filter_payload(&g->f[fi], &families[fi], info->objects[fi], memo, call, payload, n, &b,
                       &e) < 0)
        put_error(out, call, &e);
    else
        wire_put_packet(out, call->prog, call->proc, VM_REPLY, call->serial, VM_STATUS_OK, b.p,
                        b.len);
    xb_free(&b);
    evbuffer_drain(reply, evbuffer_get_length(reply));
}

/* ---- events ---- */

int grant_event_allowed(struct vm_grant *g, const struct vm_proc_info *info, const void *pkt,
                        size_t len)
{
    if (!info)
        return 1;
    for (int i = 0; i < VM_OBJ_FAMILIES; i++) {
        enum vm_obj_how how = info->objects[i];
        if (!g->f[i].patterns || (how != VM_OBJ_EVENT && how != VM_OBJ_EVENT_CB))
            continue;
        if (len < VM_HDR_LEN)
            return 0;
        struct xrd r;
        xr_init(&r, (const uint8_t *)pkt + VM_HDR_LEN, len - VM_HDR_LEN);
        if (how == VM_OBJ_EVENT_CB)
            (void)xr_i32(&r);
        struct handle h;
        if (read_handle(&r, &families[i], &h) < 0)
            return 0;
        int ok = grant_allows(g->f[i].patterns, h.name);
        if (ok)
            remember(&g->f[i], &families[i], &h);
        free(h.name);
        return ok;
    }
    return 1;
}
