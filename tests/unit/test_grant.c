/* Grants: name patterns, the name in XML definitions, and filtering of a list reply. */
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "check.h"
#include "grant.h"
#include "xmlname.h"
#include "proc.h"
#include "wire.h"

static char *web[] = {"web-*", "!web-secret", NULL};
static char *excl_first[] = {"!web-secret", "web-*", NULL};

static void test_allows(void)
{
    CHECK(grant_allows(NULL, "anything"));
    CHECK(grant_allows(web, "web-1"));
    CHECK(!grant_allows(web, "web-secret"));
    CHECK(!grant_allows(web, "vault-1"));
    CHECK(!grant_allows(web, ""));
    /* exclusions win whatever their place in the list */
    CHECK(!grant_allows(excl_first, "web-secret"));
    CHECK(grant_allows(excl_first, "web-2"));
}

static char *xml_name(const char *xml, const char *root)
{
    return xmlname_of(xml, strlen(xml), root);
}

static void check_name(const char *xml, const char *want)
{
    char *got = xml_name(xml, "domain");
    if (want)
        CHECK_STR(got, want);
    else
        CHECK(got == NULL);
    free(got);
}

static void test_xml(void)
{
    check_name("<domain type='kvm'><name>web-1</name></domain>", "web-1");
    check_name("<?xml version='1.0'?>\n<!-- c --><domain><uuid>x</uuid>\n  <name>a&amp;b</name>"
               "</domain>", "a&b");
    /* a <name> deeper down does not count; the direct child does */
    check_name("<domain><metadata><x><name>web-1</name></x></metadata><name>vault-1</name>"
               "</domain>", "vault-1");
    check_name("<domain><devices><disk/></devices><name><![CDATA[web-<2>]]></name></domain>",
               "web-<2>");
    check_name("<domain><name>web-<!-- x -->1</name></domain>", NULL);
    check_name("<domain><name>web-&#49;</name></domain>", NULL);
    check_name("<domain><name/></domain>", NULL);
    check_name("<domain><name></name></domain>", NULL);
    check_name("<network><name>web-1</name></network>", NULL);
    check_name("<domain attr='<name>'>", NULL);
    check_name("<domain a=\"x>y\"><name>q</name></domain>", "q");
    check_name("<domain></domain><name>web-1</name>", NULL);
    check_name("<domain><name>web-1", NULL);
    check_name("", NULL);
    char *n = xml_name("<pool type='dir'><name>p</name></pool>", "pool");
    CHECK_STR(n, "p");
    free(n);
}

static void put_dom(struct xbuf *b, const char *name, uint8_t u, int32_t id)
{
    uint8_t uuid[16];
    memset(uuid, u, sizeof(uuid));
    xb_string(b, name);
    xb_bytes(b, uuid, sizeof(uuid));
    xb_i32(b, id);
}

/* CONNECT_LIST_ALL_DOMAINS through a grant: the forbidden record is gone, the others keep
 * their bytes, the count follows; then a handle of a shown domain passes and one of a hidden
 * domain is "not found". */
static void test_list_filter(void)
{
    struct vm_grant *g = grant_new(web, NULL, NULL, "test:///default");
    const struct vm_proc_info *list = vm_proc_lookup(VM_PROG_REMOTE, VM_PROC_CONNECT_LIST_ALL_DOMAINS);
    const struct vm_proc_info *info = vm_proc_lookup(VM_PROG_REMOTE, VM_PROC_DOMAIN_GET_INFO);
    CHECK(g && list && info);

    struct evbuffer *call = evbuffer_new();
    struct xbuf a;
    xb_init(&a);
    xb_i32(&a, 1);
    xb_u32(&a, 0);
    wire_put_packet(call, VM_PROG_REMOTE, VM_PROC_CONNECT_LIST_ALL_DOMAINS, VM_CALL, 9, 0, a.p,
                    a.len);
    xb_free(&a);
    struct vm_grant_memo memo;
    struct vm_grant_error err;
    CHECK(grant_check_call(g, list, call, &memo, &err) == VM_GRANT_FILTER);
    struct vm_hdr ch;
    wire_hdr_peek(call, &ch);

    struct xbuf r, want;
    xb_init(&r);
    xb_init(&want);
    xb_u32(&r, 3);
    put_dom(&r, "web-1", 1, 1);
    put_dom(&r, "vault-1", 2, 2);
    put_dom(&r, "web-2", 3, -1);
    xb_u32(&r, 3);
    xb_u32(&want, 2);
    put_dom(&want, "web-1", 1, 1);
    put_dom(&want, "web-2", 3, -1);
    xb_u32(&want, 2);
    struct evbuffer *reply = evbuffer_new(), *out = evbuffer_new();
    wire_put_packet(reply, VM_PROG_REMOTE, VM_PROC_CONNECT_LIST_ALL_DOMAINS, VM_REPLY, 555, 0,
                    r.p, r.len);
    grant_filter_reply(g, list, &memo, &ch, reply, out);
    CHECK(evbuffer_get_length(reply) == 0);
    CHECK(evbuffer_get_length(out) == VM_HDR_LEN + want.len);
    const uint8_t *o = evbuffer_pullup(out, -1);
    struct vm_hdr oh;
    wire_hdr_decode(o, &oh);
    CHECK(oh.serial == 9 && oh.status == VM_STATUS_OK);
    CHECK(memcmp(o + VM_HDR_LEN, want.p, want.len) == 0);

    /* handles: web-2 was shown, vault-1 was not */
    for (int k = 0; k < 2; k++) {
        struct evbuffer *c = evbuffer_new();
        struct xbuf d;
        xb_init(&d);
        put_dom(&d, k ? "vault-1" : "web-2", k ? 2 : 3, 0);
        wire_put_packet(c, VM_PROG_REMOTE, VM_PROC_DOMAIN_GET_INFO, VM_CALL, 10, 0, d.p, d.len);
        enum vm_grant_verdict v = grant_check_call(g, info, c, &memo, &err);
        CHECK(v == (k ? VM_GRANT_REFUSED : VM_GRANT_PASS));
        if (k) {
            CHECK(err.code == 42 && err.domain == 12);
            CHECK_STR(err.message, "Domain not found: no domain with matching uuid "
                                   "'02020202-0202-0202-0202-020202020202' (vault-1)");
        }
        xb_free(&d);
        evbuffer_free(c);
    }
    xb_free(&r);
    xb_free(&want);
    evbuffer_free(reply);
    evbuffer_free(out);
    evbuffer_free(call);
    grant_free(g);
    CHECK(grant_new(NULL, NULL, NULL, "test:///default") == NULL);
}

int main(void)
{
    test_allows();
    test_xml();
    test_list_filter();
    return check_done();
}
