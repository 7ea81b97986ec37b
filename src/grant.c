/* Domain grants: see grant.h. Everything here reads XDR from the front, as libvirtd does, and
 * refuses what it cannot read rather than forwarding it unchecked. */
#include "grant.h"

#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "proc.h"
#include "util.h"

enum {
    VIR_ERR_NO_DOMAIN = 42,
    VIR_FROM_QEMU = 10,
    VIR_FROM_TEST = 12,
    VIR_FROM_LXC = 17,
    VIR_FROM_LIBXL = 41,
    VIR_FROM_CH = 72,
    VIR_FROM_BHYVE = 57,
    VIR_FROM_VBOX = 25,
    VIR_FROM_OPENVZ = 14,
    VIR_FROM_ESX = 28,
    VIR_FROM_HYPERV = 43,
    VIR_FROM_VMWARE = 39,
};
enum { LIST_ACTIVE = 1, LIST_INACTIVE = 2 };
#define UUID_LEN 16
#define LIST_MAX 16384 /* REMOTE_DOMAIN_LIST_MAX and the name/id list limits */

struct vm_grant {
    char *const *patterns;
    int driver_domain;
    int bare_lookup;     /* the test driver says just "Domain not found" for lookups */
    uint8_t (*seen)[UUID_LEN];
    uint8_t *used;
    size_t cap, count;   /* cap: a power of two, or 0 */
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

struct vm_grant *grant_new(char *const *patterns, const char *opened_name)
{
    static const struct {
        const char *driver;
        int domain;
    } drivers[] = {
        {"test", VIR_FROM_TEST},   {"qemu", VIR_FROM_QEMU}, {"lxc", VIR_FROM_LXC},
        {"xen", VIR_FROM_LIBXL},   {"ch", VIR_FROM_CH},     {"bhyve", VIR_FROM_BHYVE},
        {"vbox", VIR_FROM_VBOX},   {"openvz", VIR_FROM_OPENVZ}, {"esx", VIR_FROM_ESX},
        {"hyperv", VIR_FROM_HYPERV}, {"vmwareplayer", VIR_FROM_VMWARE},
    };
    struct vm_grant *g = vm_calloc(1, sizeof(*g));
    g->patterns = patterns;
    g->driver_domain = VIR_FROM_QEMU;
    size_t n = opened_name ? strcspn(opened_name, ":+") : 0;
    for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++) {
        if (strlen(drivers[i].driver) == n && strncmp(drivers[i].driver, opened_name, n) == 0)
            g->driver_domain = drivers[i].domain;
    }
    g->bare_lookup = g->driver_domain == VIR_FROM_TEST;
    return g;
}

void grant_free(struct vm_grant *g)
{
    if (!g)
        return;
    free(g->seen);
    free(g->used);
    free(g);
}

/* ---- the domains this session was shown: an open-addressing set of UUIDs ---- */

static size_t uuid_slot(const struct vm_grant *g, const uint8_t *uuid)
{
    /* UUIDs are random enough: their first bytes are the hash */
    uint64_t h = 0;
    memcpy(&h, uuid, sizeof(h));
    h ^= h >> 29;
    return (size_t)(h * 0x9e3779b97f4a7c15ull) & (g->cap - 1);
}

static int seen_has(const struct vm_grant *g, const uint8_t *uuid)
{
    if (!g->cap)
        return 0;
    for (size_t i = uuid_slot(g, uuid);; i = (i + 1) & (g->cap - 1)) {
        if (!g->used[i])
            return 0;
        if (memcmp(g->seen[i], uuid, UUID_LEN) == 0)
            return 1;
    }
}

static void seen_put(struct vm_grant *g, const uint8_t *uuid)
{
    size_t i = uuid_slot(g, uuid);
    while (g->used[i]) {
        if (memcmp(g->seen[i], uuid, UUID_LEN) == 0)
            return;
        i = (i + 1) & (g->cap - 1);
    }
    memcpy(g->seen[i], uuid, UUID_LEN);
    g->used[i] = 1;
    g->count++;
}

static void seen_add(struct vm_grant *g, const uint8_t *uuid)
{
    if (seen_has(g, uuid) || g->count >= VM_GRANT_SEEN_MAX)
        return;
    if ((g->count + 1) * 2 > g->cap) {
        struct vm_grant old = *g;
        g->cap = old.cap ? old.cap * 2 : 64;
        g->seen = vm_calloc(g->cap, UUID_LEN);
        g->used = vm_calloc(g->cap, 1);
        g->count = 0;
        for (size_t i = 0; i < old.cap; i++)
            if (old.used[i])
                seen_put(g, old.seen[i]);
        free(old.seen);
        free(old.used);
    }
    seen_put(g, uuid);
}

/* ---- reading domains ---- */

/* remote_nonnull_domain: {string name; opaque uuid[16]; int id}. name is malloc'd. */
struct dom {
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

static int read_dom(struct xrd *r, struct dom *d)
{
    d->name = xr_string(r, VM_STRING_MAX);
    read_raw(r, d->uuid, UUID_LEN);
    d->id = xr_i32(r);
    if (r->err) {
        free(d->name);
        d->name = NULL;
        return -1;
    }
    return 0;
}

static void uuid_str(const uint8_t *u, char out[37])
{
    snprintf(out, 37,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
             u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
             u[15]);
}

/* ---- errors, worded as the driver words a missing domain ---- */

static void set_error(struct vm_grant_error *e, int code, int domain, const char *str1,
                      const char *detail)
{
    e->code = code;
    e->domain = domain;
    snprintf(e->str1, sizeof(e->str1), "%s", str1 ? str1 : "");
    snprintf(e->str2, sizeof(e->str2), "%s", detail ? detail : "");
    if (detail)
        snprintf(e->message, sizeof(e->message), "%s: %s", "Domain not found", detail);
    else
        snprintf(e->message, sizeof(e->message), "%s", str1 ? str1 : "");
}

/* A call naming a domain by handle: the driver looked its UUID up and did not find it. */
static void not_found_handle(const struct vm_grant *g, const struct dom *d,
                             struct vm_grant_error *e)
{
    char u[37], detail[sizeof(e->str2)];
    uuid_str(d->uuid, u);
    snprintf(detail, sizeof(detail), "no domain with matching uuid '%s' (%.400s)", u, d->name);
    set_error(e, VIR_ERR_NO_DOMAIN, g->driver_domain, "Domain not found: %s", detail);
}

/* A lookup found nothing: `what` is "name 'x'", "uuid 'u'" or "id 3". */
static void not_found_lookup(const struct vm_grant *g, const char *what,
                             struct vm_grant_error *e)
{
    if (g->bare_lookup) {
        set_error(e, VIR_ERR_NO_DOMAIN, g->driver_domain, "Domain not found", NULL);
        return;
    }
    char detail[sizeof(e->str2)];
    snprintf(detail, sizeof(detail), "no domain with matching %s", what);
    set_error(e, VIR_ERR_NO_DOMAIN, g->driver_domain, "Domain not found: %s", detail);
}

static void access_error(struct vm_grant_error *e, const char *text)
{
    e->code = VIR_ERR_ACCESS_DENIED;
    e->domain = VIR_FROM_ACCESS;
    e->str1[0] = e->str2[0] = '\0';
    snprintf(e->message, sizeof(e->message), "access denied: virtmux: %s", text);
}

static void outside_grant(struct vm_grant_error *e, const char *name)
{
    char text[400];
    snprintf(text, sizeof(text), "domain '%.300s' is outside this client's grant", name);
    access_error(e, text);
}

static void decode_error(struct vm_grant_error *e)
{
    e->code = VIR_ERR_RPC;
    e->domain = VIR_FROM_RPC;
    e->str1[0] = e->str2[0] = '\0';
    snprintf(e->message, sizeof(e->message), "Unable to decode message payload");
}

/* ---- the name inside domain XML ---- */

static int name_char_ok(unsigned char c)
{
    return c >= 0x20 && c != 0x7f;
}

/* Decode the character data between p and end (entities, CDATA) into a malloc'd string;
 * NULL when it holds markup or anything odd. */
static char *xml_text(const char *p, const char *end)
{
    size_t cap = (size_t)(end - p) + 1;
    char *out = vm_calloc(1, cap), *o = out;
    while (p < end) {
        if (*p == '<') {
            static const char cdata[] = "<![CDATA[";
            if ((size_t)(end - p) >= sizeof(cdata) - 1 &&
                memcmp(p, cdata, sizeof(cdata) - 1) == 0) {
                const char *s = p + sizeof(cdata) - 1;
                const char *close = NULL;
                for (const char *q = s; q + 3 <= end; q++)
                    if (memcmp(q, "]]>", 3) == 0) {
                        close = q;
                        break;
                    }
                if (!close)
                    goto bad;
                memcpy(o, s, (size_t)(close - s));
                o += close - s;
                p = close + 3;
                continue;
            }
            goto bad; /* an element or comment inside <name>: not a plain name */
        }
        if (*p == '&') {
            static const struct {
                const char *ent;
                char c;
            } ents[] = {{"&lt;", '<'}, {"&gt;", '>'}, {"&amp;", '&'}, {"&quot;", '"'},
                        {"&apos;", '\''}};
            size_t i;
            for (i = 0; i < sizeof(ents) / sizeof(ents[0]); i++) {
                size_t n = strlen(ents[i].ent);
                if ((size_t)(end - p) >= n && memcmp(p, ents[i].ent, n) == 0) {
                    *o++ = ents[i].c;
                    p += n;
                    break;
                }
            }
            if (i == sizeof(ents) / sizeof(ents[0]))
                goto bad; /* character references and others: refuse rather than guess */
            continue;
        }
        *o++ = *p++;
    }
    *o = '\0';
    for (const char *c = out; *c; c++)
        if (!name_char_ok((unsigned char)*c) && *c != '\t' && *c != '\n' && *c != '\r')
            goto bad;
    if (!*out)
        goto bad;
    return out;
bad:
    free(out);
    return NULL;
}

/* Step over a comment, processing instruction or declaration at p ("<!--", "<?", "<!");
 * returns the position after it or NULL. */
static const char *skip_special(const char *p, const char *end)
{
    const char *close;
    size_t closelen;
    if (end - p >= 4 && memcmp(p, "<!--", 4) == 0) {
        close = "-->";
        closelen = 3;
        p += 4;
    } else if (end - p >= 2 && p[1] == '?') {
        close = "?>";
        closelen = 2;
        p += 2;
    } else {
        /* <!DOCTYPE ...> (no internal subset) or <![CDATA[ outside <name> */
        if (end - p >= 9 && memcmp(p, "<![CDATA[", 9) == 0) {
            close = "]]>";
            closelen = 3;
        } else {
            close = ">";
            closelen = 1;
        }
        p += 2;
    }
    for (; p + closelen <= end; p++)
        if (memcmp(p, close, closelen) == 0)
            return p + closelen;
    return NULL;
}

/* The end of the start or end tag at p ('<'), quotes respected; NULL if unterminated. */
static const char *tag_end(const char *p, const char *end)
{
    char quote = 0;
    for (p++; p < end; p++) {
        if (quote) {
            if (*p == quote)
                quote = 0;
        } else if (*p == '"' || *p == '\'') {
            quote = *p;
        } else if (*p == '<') {
            return NULL;
        } else if (*p == '>') {
            return p;
        }
    }
    return NULL;
}

static int tag_is(const char *p, const char *tend, const char *name)
{
    size_t n = strlen(name);
    if ((size_t)(tend - p) < n || memcmp(p, name, n) != 0)
        return 0;
    char c = p[n];
    return c == '>' || c == '/' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

char *grant_xml_domain_name(const char *xml, size_t len)
{
    const char *p = xml, *end = xml + len;
    int depth = 0;
    while (p < end) {
        if (*p != '<') {
            p++;
            continue;
        }
        if (end - p >= 2 && (p[1] == '!' || p[1] == '?')) {
            p = skip_special(p, end);
            if (!p)
                return NULL;
            continue;
        }
        const char *te = tag_end(p, end);
        if (!te)
            return NULL;
        if (p[1] == '/') {
            if (--depth <= 0)
                return NULL; /* the root closed without a <name> */
            p = te + 1;
            continue;
        }
        int selfclosing = te[-1] == '/';
        if (depth == 0) {
            if (!tag_is(p + 1, te, "domain") || selfclosing)
                return NULL;
        } else if (depth == 1 && tag_is(p + 1, te, "name")) {
            if (selfclosing)
                return NULL;
            const char *s = te + 1, *q;
            /* the text runs to the first "</name" that is not inside CDATA */
            for (q = s; q < end; q++) {
                if (end - q >= 9 && memcmp(q, "<![CDATA[", 9) == 0) {
                    const char *c = q + 9;
                    while (c + 3 <= end && memcmp(c, "]]>", 3) != 0)
                        c++;
                    if (c + 3 > end)
                        return NULL;
                    q = c + 2;
                    continue;
                }
                if (end - q >= 7 && memcmp(q, "</name", 6) == 0 &&
                    (q[6] == '>' || q[6] == ' ' || q[6] == '\t' || q[6] == '\n' ||
                     q[6] == '\r'))
                    return xml_text(s, q);
            }
            return NULL;
        }
        if (!selfclosing)
            depth++;
        p = te + 1;
    }
    return NULL;
}

/* ---- calls ---- */

static const uint8_t *payload_of(struct evbuffer *pkt, size_t *n)
{
    size_t len = evbuffer_get_length(pkt);
    const uint8_t *p = evbuffer_pullup(pkt, -1);
    *n = len - VM_HDR_LEN;
    return p + VM_HDR_LEN;
}

/* Replace the call in `pkt` by CONNECT_LIST_ALL_DOMAINS(need_results = 1, flags). */
static void rewrite_list_all(struct evbuffer *pkt, uint32_t flags)
{
    struct vm_hdr h;
    wire_hdr_peek(pkt, &h);
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, 1);
    xb_u32(&b, flags);
    evbuffer_drain(pkt, evbuffer_get_length(pkt));
    wire_put_packet(pkt, h.prog, VM_PROC_CONNECT_LIST_ALL_DOMAINS, h.type, h.serial, h.status,
                    b.p, b.len);
    xb_free(&b);
}

/* A call that names a domain by handle: only domains this session was shown. */
static enum vm_grant_verdict check_handle(struct vm_grant *g, struct xrd *r,
                                          struct vm_grant_error *err)
{
    struct dom d;
    if (read_dom(r, &d) < 0) {
        decode_error(err);
        return VM_GRANT_REFUSED;
    }
    enum vm_grant_verdict v = VM_GRANT_PASS;
    if (!seen_has(g, d.uuid)) {
        not_found_handle(g, &d, err);
        v = VM_GRANT_REFUSED;
    }
    free(d.name);
    return v;
}

enum vm_grant_verdict grant_check_call(struct vm_grant *g, const struct vm_proc_info *info,
                                       struct evbuffer *pkt, uint32_t *aux,
                                       struct vm_grant_error *err)
{
    *aux = 0;
    if (!info || info->dom == VM_DOM_NONE)
        return VM_GRANT_PASS;
    size_t n;
    const uint8_t *args = payload_of(pkt, &n);
    struct xrd r;
    xr_init(&r, args, n);
    switch (info->dom) {
    case VM_DOM_NONE:
    case VM_DOM_EVENT:
    case VM_DOM_EVENT_CB:
        return VM_GRANT_PASS;
    case VM_DOM_ARG:
        return check_handle(g, &r, err);
    case VM_DOM_IN_ARG:
        xr_skip_string(&r);
        return check_handle(g, &r, err);
    case VM_DOM_RENAME: {
        enum vm_grant_verdict v = check_handle(g, &r, err);
        if (v != VM_GRANT_PASS)
            return v;
        int present;
        char *to = xr_opt_string(&r, VM_STRING_MAX, &present);
        if (r.err) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        if (present && !grant_allows(g->patterns, to)) {
            outside_grant(err, to);
            v = VM_GRANT_REFUSED;
        }
        free(to);
        return v;
    }
    case VM_DOM_XML: {
        uint32_t len = xr_u32(&r);
        if (r.err || len > VM_STRING_MAX || r.len - r.off < len) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        char *name = grant_xml_domain_name((const char *)r.p + r.off, len);
        if (!name) {
            access_error(err, "cannot read the domain name in the XML");
            return VM_GRANT_REFUSED;
        }
        enum vm_grant_verdict v = VM_GRANT_FILTER;
        if (!grant_allows(g->patterns, name)) {
            outside_grant(err, name);
            v = VM_GRANT_REFUSED;
        }
        free(name);
        return v;
    }
    case VM_DOM_LOOKUP_NAME: {
        char *name = xr_string(&r, VM_STRING_MAX);
        if (!name) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        enum vm_grant_verdict v = VM_GRANT_FILTER;
        if (!grant_allows(g->patterns, name)) {
            char what[320];
            snprintf(what, sizeof(what), "name '%.300s'", name);
            not_found_lookup(g, what, err);
            v = VM_GRANT_REFUSED;
        }
        free(name);
        return v;
    }
    case VM_DOM_LOOKUP:
    case VM_DOM_STATS_ALL:
        return VM_GRANT_FILTER;
    case VM_DOM_LIST_ALL: {
        int32_t need = xr_i32(&r);
        if (r.err || r.len - r.off < 4) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        *aux = need != 0;
        if (!need) {
            /* the client wants only the count: ask for the list, count what it may see */
            uint8_t *w = (uint8_t *)args;
            w[3] = 1;
        }
        return VM_GRANT_FILTER;
    }
    case VM_DOM_LIST_IDS:
    case VM_DOM_LIST_NAMES: {
        int32_t max = xr_i32(&r);
        if (r.err || max < 0 || max > LIST_MAX) {
            decode_error(err);
            return VM_GRANT_REFUSED;
        }
        *aux = (uint32_t)max;
        rewrite_list_all(pkt, info->dom == VM_DOM_LIST_IDS ? LIST_ACTIVE : LIST_INACTIVE);
        return VM_GRANT_FILTER;
    }
    case VM_DOM_NUM_ACTIVE:
    case VM_DOM_NUM_DEFINED:
        rewrite_list_all(pkt, info->dom == VM_DOM_NUM_ACTIVE ? LIST_ACTIVE : LIST_INACTIVE);
        return VM_GRANT_FILTER;
    case VM_DOM_REFUSE: {
        char text[200];
        snprintf(text, sizeof(text), "%s is not available to clients limited to some domains",
                 info->name);
        access_error(err, text);
        return VM_GRANT_REFUSED;
    }
    }
    return VM_GRANT_PASS;
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

/* One domain (or stats record) of a list: kept or not, and where its bytes are. */
struct item {
    size_t start, end;
    struct dom d;
    int keep;
};

/* Read `count` then the items of a domain list (stats: records with params). */
static struct item *read_items(struct vm_grant *g, struct xrd *r, int stats, uint32_t *count)
{
    uint32_t n = xr_u32(r);
    if (r->err || n > LIST_MAX || n > (r->len - r->off) / 24) {
        r->err = 1;
        return NULL;
    }
    struct item *items = vm_calloc(n ? n : 1, sizeof(*items));
    for (uint32_t i = 0; i < n && !r->err; i++) {
        items[i].start = r->off;
        if (read_dom(r, &items[i].d) < 0)
            break;
        if (stats) {
            uint32_t np = xr_u32(r);
            if (np > (r->len - r->off) / 12)
                r->err = 1;
            for (uint32_t k = 0; k < np && !r->err; k++)
                skip_typed_param(r);
        }
        items[i].end = r->off;
        items[i].keep = grant_allows(g->patterns, items[i].d.name);
    }
    *count = n;
    return items;
}

static void free_items(struct item *items, uint32_t n)
{
    for (uint32_t i = 0; items && i < n; i++)
        free(items[i].d.name);
    free(items);
}

void grant_filter_reply(struct vm_grant *g, const struct vm_proc_info *info, uint32_t aux,
                        const struct vm_hdr *call, struct evbuffer *reply, struct evbuffer *out)
{
    struct vm_hdr h;
    wire_hdr_peek(reply, &h);
    size_t n;
    const uint8_t *payload = payload_of(reply, &n);
    if (h.status != VM_STATUS_OK) {
        /* an error passes as it is, answered as the client's procedure */
        wire_put_packet(out, call->prog, call->proc, VM_REPLY, call->serial, h.status, payload,
                        n);
        evbuffer_drain(reply, evbuffer_get_length(reply));
        return;
    }
    struct xrd r;
    xr_init(&r, payload, n);
    struct xbuf b;
    xb_init(&b);
    struct vm_grant_error e;
    int refused = 0;
    switch (info->dom) {
    case VM_DOM_XML:
    case VM_DOM_LOOKUP_NAME:
    case VM_DOM_LOOKUP: {
        struct dom d;
        if (read_dom(&r, &d) < 0) {
            r.err = 1;
            break;
        }
        if (grant_allows(g->patterns, d.name)) {
            seen_add(g, d.uuid);
            xb_bytes(&b, payload, n);
        } else {
            char what[320], u[37];
            uuid_str(d.uuid, u);
            if (call->proc == VM_PROC_DOMAIN_LOOKUP_BY_ID && call->prog == VM_PROG_REMOTE)
                snprintf(what, sizeof(what), "id %d", (int)d.id);
            else if (call->proc == VM_PROC_DOMAIN_LOOKUP_BY_UUID && call->prog == VM_PROG_REMOTE)
                snprintf(what, sizeof(what), "uuid '%s'", u);
            else
                snprintf(what, sizeof(what), "name '%.300s'", d.name);
            not_found_lookup(g, what, &e);
            refused = 1;
        }
        free(d.name);
        break;
    }
    case VM_DOM_LIST_ALL:
    case VM_DOM_STATS_ALL: {
        uint32_t count = 0, kept = 0;
        struct item *items = read_items(g, &r, info->dom == VM_DOM_STATS_ALL, &count);
        if (info->dom == VM_DOM_LIST_ALL)
            (void)xr_u32(&r); /* ret: the upstream's count, replaced below */
        if (!r.err) {
            for (uint32_t i = 0; i < count; i++)
                kept += items[i].keep;
            int list = info->dom == VM_DOM_STATS_ALL || aux;
            xb_u32(&b, list ? kept : 0);
            for (uint32_t i = 0; list && i < count; i++) {
                if (!items[i].keep)
                    continue;
                seen_add(g, items[i].d.uuid);
                xb_bytes(&b, payload + items[i].start, items[i].end - items[i].start);
            }
            if (info->dom == VM_DOM_LIST_ALL)
                xb_u32(&b, kept);
        }
        free_items(items, count);
        break;
    }
    case VM_DOM_LIST_IDS:
    case VM_DOM_LIST_NAMES:
    case VM_DOM_NUM_ACTIVE:
    case VM_DOM_NUM_DEFINED: {
        uint32_t count = 0, kept = 0;
        struct item *items = read_items(g, &r, 0, &count);
        if (!r.err) {
            for (uint32_t i = 0; i < count; i++)
                kept += items[i].keep;
            if (info->dom == VM_DOM_NUM_ACTIVE || info->dom == VM_DOM_NUM_DEFINED) {
                xb_i32(&b, (int32_t)kept);
            } else {
                uint32_t k = kept < aux ? kept : aux;
                xb_u32(&b, k);
                for (uint32_t i = 0, w = 0; i < count && w < k; i++) {
                    if (!items[i].keep)
                        continue;
                    if (info->dom == VM_DOM_LIST_IDS)
                        xb_i32(&b, items[i].d.id);
                    else
                        xb_string(&b, items[i].d.name);
                    w++;
                }
            }
        }
        free_items(items, count);
        break;
    }
    default:
        xb_bytes(&b, payload, n);
        break;
    }
    if (r.err) {
        decode_error(&e);
        refused = 1;
    }
    if (refused)
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
    if (!info || (info->dom != VM_DOM_EVENT && info->dom != VM_DOM_EVENT_CB))
        return 1;
    if (len < VM_HDR_LEN)
        return 0;
    struct xrd r;
    xr_init(&r, (const uint8_t *)pkt + VM_HDR_LEN, len - VM_HDR_LEN);
    if (info->dom == VM_DOM_EVENT_CB)
        (void)xr_i32(&r);
    struct dom d;
    if (read_dom(&r, &d) < 0)
        return 0;
    int ok = grant_allows(g->patterns, d.name);
    if (ok)
        seen_add(g, d.uuid);
    free(d.name);
    return ok;
}
