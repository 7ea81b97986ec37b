/* Table-driven tests of the policy decisions: which rule an identity gets, which upstreams it
 * may reach, and the read-only allowlist over the whole generated procedure table. */
#include <arpa/inet.h>
#include <stdlib.h>

#include <event2/buffer.h>

#include "check.h"
#include "config.h"
#include "identity.h"
#include "policy.h"
#include "proc.h"

static const char *cfg_json =
    "{\"listeners\":[{\"name\":\"tcp\",\"address\":\"127.0.0.1:1\"},"
    "                {\"name\":\"local\",\"unix\":\"/tmp/x.sock\"},"
    "                {\"name\":\"mon-ro\",\"address\":\"127.0.0.1:2\",\"readonly\":true}],"
    " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://h1/system\"},"
    "                {\"name\":\"hv2\",\"uri\":\"qemu+tcp://h2/system\"}],"
    " \"policy\":{\"default\":\"deny\",\"rules\":["
    "   {\"match\":{\"source\":\"10.0.0.0/8\",\"listener\":\"tcp\"},\"deny\":true},"
    "   {\"match\":{\"unix_uid\":0},\"upstreams\":\"*\"},"
    "   {\"match\":{\"unix_gid\":100},\"readonly\":true,\"upstreams\":[\"hv1\"]},"
    "   {\"match\":{\"listener\":\"mon-*\"},\"readonly\":true,\"max_sessions\":3},"
    "   {\"match\":{\"source\":\"192.168.1.0/24\"},\"upstreams\":[\"hv2\"]},"
    "   {\"match\":{\"source\":\"fd00::/8\"},\"readonly\":true},"
    "   {\"match\":{\"sasl_user\":\"mon*\"},\"readonly\":true}"
    " ]}}";

static struct vm_identity tcp_id(const char *listener, const char *ip)
{
    struct vm_identity id = {0};
    id.listener = listener;
    snprintf(id.source, sizeof(id.source), "%s", ip);
    if (strchr(ip, ':')) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&id.addr;
        a->sin6_family = AF_INET6;
        inet_pton(AF_INET6, ip, &a->sin6_addr);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&id.addr;
        a->sin_family = AF_INET;
        inet_pton(AF_INET, ip, &a->sin_addr);
    }
    return id;
}

static struct vm_identity unix_id(uid_t uid, gid_t gid)
{
    struct vm_identity id = {0};
    id.listener = "local";
    id.is_unix = 1;
    id.has_cred = 1;
    id.uid = uid;
    id.gid = gid;
    return id;
}

static void test_rules(const struct vm_config *cfg)
{
    struct {
        struct vm_identity id;
        int want_index; /* -1: default */
        int deny, readonly, hv1, hv2;
    } rows[] = {
        {tcp_id("tcp", "10.1.2.3"), 0, 1, 0, 1, 1},
        {tcp_id("mon-ro", "10.1.2.3"), 3, 0, 1, 1, 1}, /* rule 0 is for listener tcp only */
        {unix_id(0, 0), 1, 0, 0, 1, 1},
        {unix_id(1000, 100), 2, 0, 1, 1, 0},
        {unix_id(1000, 1000), -1, 1, 0, 1, 1},
        {tcp_id("tcp", "192.168.1.77"), 4, 0, 0, 0, 1},
        {tcp_id("tcp", "192.168.2.77"), -1, 1, 0, 1, 1},
        {tcp_id("tcp", "fd12::1"), 5, 0, 1, 1, 1},
        {tcp_id("tcp", "fe80::1"), -1, 1, 0, 1, 1},
        {tcp_id("tcp", "127.0.0.1"), -1, 1, 0, 1, 1},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const struct vm_rule *r = policy_match(cfg, &rows[i].id);
        CHECK(r->index == rows[i].want_index);
        CHECK(r->deny == rows[i].deny);
        CHECK(r->readonly == rows[i].readonly);
        CHECK(policy_allows_upstream(r, "hv1") == rows[i].hv1);
        CHECK(policy_allows_upstream(r, "hv2") == rows[i].hv2);
        if (r->index != rows[i].want_index)
            fprintf(stderr, "  row %zu matched rule %d\n", i, r->index);
    }
    CHECK(cfg->rules[3].max_sessions == 3);

    /* A SASL identity (once auth exists) matches the glob rule. */
    struct vm_identity sasl = tcp_id("tcp", "127.0.0.1");
    sasl.sasl_user = "monitor1";
    CHECK(policy_match(cfg, &sasl)->index == 6);

    /* IPv4-mapped IPv6 peers match IPv4 rules. */
    struct vm_identity mapped = tcp_id("tcp", "::ffff:10.9.9.9");
    CHECK(policy_match(cfg, &mapped)->index == 0);
}

/* A CALL packet for (prog, proc) whose arguments are a domain reference (preceded by a name
 * for snapshot/checkpoint procedures when `named`), then `words`, then `trailing` zero words. */
static struct evbuffer *call_pkt(uint32_t prog, int32_t proc, int named, const uint32_t *words,
                                 int nwords, int trailing, struct vm_hdr *h)
{
    struct xbuf b;
    xb_init(&b);
    if (named)
        xb_string(&b, "snap1");
    xb_string(&b, "test");
    unsigned char uuid[16] = {0x66, 0x95};
    xb_bytes(&b, uuid, sizeof(uuid));
    xb_i32(&b, -1);
    for (int i = 0; i < nwords; i++)
        xb_u32(&b, words[i]);
    for (int i = 0; i < trailing; i++)
        xb_u32(&b, 0);
    struct evbuffer *pkt = evbuffer_new();
    wire_put_packet(pkt, prog, proc, VM_CALL, 1, VM_STATUS_OK, b.p, b.len);
    wire_hdr_peek(pkt, h);
    xb_free(&b);
    return pkt;
}

static int allows(uint32_t prog, int32_t proc, int named, const uint32_t *w, int nw, int trailing,
                  char *msg, size_t len, int *dom)
{
    struct vm_hdr h;
    struct evbuffer *pkt = call_pkt(prog, proc, named, w, nw, trailing, &h);
    int ok = policy_readonly_allows(&h, pkt, msg, len, dom);
    evbuffer_free(pkt);
    return ok;
}

static void test_readonly_table(void)
{
    char msg[256];
    int dom;
    int allowed = 0, refused = 0;
    const uint32_t zeros[3] = {0, 0, 0};
    for (size_t i = 0; i < vm_proc_table_len; i++) {
        const struct vm_proc_info *p = &vm_proc_table[i];
        if (p->prog == VM_PROG_KEEPALIVE)
            continue;
        int named = p->ro_arg == VM_RO_ARG_NAME_DOM;
        /* Every deciding word clear: only "no", QEMU and LXC are refused. */
        int ok = allows(p->prog, p->proc, named, zeros, 3, 0, msg, sizeof(msg), &dom);
        int want = p->prog == VM_PROG_REMOTE && p->ro != VM_RO_NO;
        CHECK(ok == want);
        if (ok != want)
            fprintf(stderr, "  %s: allowed=%d\n", p->name, ok);
        if (!ok) {
            refused++;
            CHECK(strncmp(msg, "operation forbidden: ", 21) == 0);
            CHECK(p->api == NULL || strstr(msg, p->api) != NULL);
            CHECK(dom == p->err_domain);
        } else {
            allowed++;
        }
        if (p->ro != VM_RO_FLAGS)
            continue;
        /* Deciding word set: refused, even with trailing bytes after the arguments (libvirtd
         * ignores those, so they must not move the word the gateway looks at). */
        uint32_t set[3] = {0, 0, 0};
        set[p->ro_word] = p->ro_value;
        for (int trailing = 0; trailing <= 2; trailing++) {
            CHECK(!allows(p->prog, p->proc, named, set, 2, trailing, msg, sizeof(msg), &dom));
            CHECK(strstr(msg, p->ro_message) != NULL);
        }
        /* Arguments too short to reach the word: refused (never guess for a write). */
        CHECK(!allows(p->prog, p->proc, named, set, 0, 0, msg, sizeof(msg), &dom));
    }
    CHECK(refused == 197 + 7 + 1); /* every REMOTE "no" (197), every QEMU (7), the LXC one */
    CHECK(allowed > 200);

    /* Spot checks: the wording and error domain libvirtd uses. */
    CHECK(!allows(VM_PROG_REMOTE, 12, 0, NULL, 0, 0, msg, sizeof(msg), &dom)); /* DESTROY */
    CHECK_STR(msg, "operation forbidden: read only access prevents virDomainDestroy");
    CHECK(dom == 20);
    const uint32_t secure[1] = {1}, inactive[1] = {2};
    CHECK(!allows(VM_PROG_REMOTE, 14, 0, secure, 1, 0, msg, sizeof(msg), &dom));
    CHECK_STR(msg, "operation forbidden: virDomainGetXMLDesc with secure flag");
    CHECK(allows(VM_PROG_REMOTE, 14, 0, inactive, 1, 0, msg, sizeof(msg), &dom));
    CHECK(!allows(VM_PROG_REMOTE, 42, 0, NULL, 0, 0, msg, sizeof(msg), &dom)); /* NET_DESTROY */
    CHECK(dom == 19);
    CHECK(!allows(VM_PROG_REMOTE, 192, 0, NULL, 0, 0, msg, sizeof(msg), &dom)); /* REVERT */
    CHECK(dom == 35);
    CHECK(!allows(VM_PROG_REMOTE, 250, 0, NULL, 0, 0, msg, sizeof(msg), &dom)); /* NODE_SUSPEND */
    CHECK(dom == 20);
    CHECK(!allows(VM_PROG_REMOTE, 9999, 0, NULL, 0, 0, msg, sizeof(msg), &dom)); /* unknown */
    /* DOMAIN_INTERFACE_ADDRESSES: source AGENT (1) refused, LEASE (0) allowed. */
    const uint32_t agent[2] = {1, 0}, lease[2] = {0, 0};
    CHECK(!allows(VM_PROG_REMOTE, 353, 0, agent, 2, 0, msg, sizeof(msg), &dom));
    CHECK(allows(VM_PROG_REMOTE, 353, 0, lease, 2, 0, msg, sizeof(msg), &dom));
}

int main(void)
{
    struct vm_config *cfg = config_parse(cfg_json, stderr);
    CHECK(cfg != NULL);
    if (!cfg)
        return check_done();
    test_rules(cfg);
    test_readonly_table();

    /* No policy section: everybody is admitted read-write everywhere. */
    struct vm_config *open = config_parse(
        "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
        " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"qemu+tcp://h1/system\"}]}", stderr);
    struct vm_identity id = tcp_id("listener0", "10.0.0.1");
    const struct vm_rule *r = policy_match(open, &id);
    CHECK(!r->deny && !r->readonly && policy_allows_upstream(r, "hv1"));
    config_free(open);

    /* Globs in "upstreams": over named upstreams and names made from templates alike. */
    struct vm_config *globs = config_parse(
        "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
        " \"upstream_templates\":[{\"match\":\"hv-*\",\"uri\":\"qemu+tcp://{name}/system\"}],"
        " \"upstreams\":[{\"name\":\"lab\",\"uri\":\"qemu+tcp://h1/system\"}],"
        " \"policy\":{\"default\":{\"upstreams\":[\"hv-1?\", \"hv-[ab]*\", \"lab\", "
        "\"hv-7\"]}}}", stderr);
    CHECK(globs != NULL);
    if (globs) {
        r = policy_match(globs, &id);
        CHECK(policy_allows_upstream(r, "hv-12") && policy_allows_upstream(r, "hv-b.x"));
        CHECK(policy_allows_upstream(r, "lab") && policy_allows_upstream(r, "hv-7"));
        CHECK(!policy_allows_upstream(r, "hv-1") && !policy_allows_upstream(r, "hv-123"));
        CHECK(!policy_allows_upstream(r, "hv-c") && !policy_allows_upstream(r, "labx"));
        config_free(globs);
    }
    config_free(cfg);
    return check_done();
}
