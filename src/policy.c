/*
 * Policy decisions. Rules come from the config snapshot (config.c parses them); this file only
 * decides. Two questions are asked:
 *
 *   at CONNECT_OPEN   policy_match(identity) -> rule: deny? read-only? which upstreams?
 *   at every call of a read-only session      policy_readonly_allows(header, packet)
 *
 * The second is the gateway's half of "read-only enforced twice"; the other half is that
 * read-only sessions only ride upstream connections opened with VIR_CONNECT_RO.
 */
#include "policy.h"

#include <arpa/inet.h>
#include <fnmatch.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include <event2/buffer.h>

#include "config.h"
#include "identity.h"
#include "proc.h"

const char *identity_str(const struct vm_identity *id, char *buf, size_t len)
{
    if (id->sasl_user)
        snprintf(buf, len, "%s@%s", id->sasl_user, id->listener);
    else if (id->tls_dn)
        snprintf(buf, len, "%s@%s", id->tls_dn, id->listener);
    else if (id->has_cred)
        snprintf(buf, len, "uid=%u@%s", (unsigned)id->uid, id->listener);
    else
        snprintf(buf, len, "%s@%s", id->source[0] ? id->source : "unix", id->listener);
    return buf;
}

const char *identity_source(const struct vm_identity *id, char *buf, size_t len)
{
    if (id->has_cred)
        snprintf(buf, len, "uid=%u", (unsigned)id->uid);
    else
        snprintf(buf, len, "%s", id->source[0] ? id->source : "unix");
    return buf;
}

static int glob_match(const char *pattern, const char *s)
{
    return s && fnmatch(pattern, s, 0) == 0;
}

static int cidr_match(const struct vm_rule *r, const struct sockaddr_storage *ss)
{
    const unsigned char *addr;
    unsigned char mapped[4];
    if (ss->ss_family == AF_INET && r->family == AF_INET) {
        addr = (const unsigned char *)&((const struct sockaddr_in *)ss)->sin_addr;
    } else if (ss->ss_family == AF_INET6 && r->family == AF_INET6) {
        addr = ((const struct sockaddr_in6 *)ss)->sin6_addr.s6_addr;
    } else if (ss->ss_family == AF_INET6 && r->family == AF_INET &&
               IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)ss)->sin6_addr)) {
        memcpy(mapped, ((const struct sockaddr_in6 *)ss)->sin6_addr.s6_addr + 12, 4);
        addr = mapped;
    } else {
        return 0;
    }
    int bits = r->prefix;
    for (int i = 0; bits > 0; i++, bits -= 8) {
        unsigned char mask = bits >= 8 ? 0xff : (unsigned char)(0xff << (8 - bits));
        if ((addr[i] & mask) != (r->net[i] & mask))
            return 0;
    }
    return 1;
}

static int rule_matches(const struct vm_rule *r, const struct vm_identity *id)
{
    if (r->listener && !glob_match(r->listener, id->listener))
        return 0;
    if (r->sasl_user && !glob_match(r->sasl_user, id->sasl_user))
        return 0;
    if (r->tls_dn && !glob_match(r->tls_dn, id->tls_dn))
        return 0;
    if (r->uid >= 0 && (!id->has_cred || (long)id->uid != r->uid))
        return 0;
    if (r->gid >= 0 && (!id->has_cred || (long)id->gid != r->gid))
        return 0;
    if (r->has_cidr && (id->is_unix || !cidr_match(r, &id->addr)))
        return 0;
    return 1;
}

static const struct vm_rule allow_all = {.index = -1, .uid = -1, .gid = -1};

const struct vm_rule *policy_match(const struct vm_config *cfg, const struct vm_identity *id)
{
    if (!cfg->policy_present)
        return &allow_all;
    for (int i = 0; i < cfg->nrules; i++)
        if (rule_matches(&cfg->rules[i], id))
            return &cfg->rules[i];
    return &cfg->default_rule;
}

int policy_allows_upstream(const struct vm_rule *rule, const char *name)
{
    if (!rule->upstreams)
        return 1;
    for (char **u = rule->upstreams; *u; u++)
        if (fnmatch(*u, name, 0) == 0) /* "*" and exact names are globs too */
            return 1;
    return 0;
}

/* The deciding word of a "flags" procedure, read from the front of the arguments the way
 * libvirtd decodes them; -1 when the arguments do not even reach it (then: refuse). */
static int deciding_word(const struct vm_proc_info *p, const struct vm_hdr *h,
                         struct evbuffer *pkt, uint32_t *out)
{
    size_t n = h->len - VM_HDR_LEN;
    if (n > 65536)
        return -1; /* these argument blocks are tiny; a huge one is not worth pulling up */
    struct xrd r;
    xr_init(&r, evbuffer_pullup(pkt, -1) + VM_HDR_LEN, n);
    if (p->ro_arg == VM_RO_ARG_NAME_DOM)
        xr_skip_string(&r);
    xr_skip_string(&r); /* domain name */
    xr_u32(&r);       /* uuid[16] */
    xr_u32(&r);
    xr_u32(&r);
    xr_u32(&r);
    xr_i32(&r);       /* id */
    for (int i = 0; i < p->ro_word; i++)
        xr_u32(&r);
    *out = xr_u32(&r);
    return r.err ? -1 : 0;
}

int policy_readonly_allows(const struct vm_hdr *h, struct evbuffer *pkt, char *msg, size_t len,
                           int *domain)
{
    const struct vm_proc_info *p = vm_proc_lookup(h->prog, h->proc);
    *domain = VIR_FROM_NONE;
    if (!p) {
        snprintf(msg, len, "operation forbidden: virtmux refuses unknown procedure %d of "
                 "program 0x%x to read-only clients", h->proc, h->prog);
        return 0;
    }
    if (h->prog == VM_PROG_QEMU || h->prog == VM_PROG_LXC) {
        *domain = p->err_domain;
        snprintf(msg, len, "operation forbidden: read only access prevents %s",
                 p->api ? p->api : p->name);
        return 0;
    }
    if (p->ro == VM_RO_YES)
        return 1;
    *domain = p->err_domain;
    if (p->ro == VM_RO_FLAGS) {
        uint32_t word;
        if (deciding_word(p, h, pkt, &word) == 0) {
            int set = p->ro_test == VM_RO_TEST_MASK ? (word & p->ro_value) != 0
                                                    : word == p->ro_value;
            if (!set)
                return 1;
        }
        snprintf(msg, len, "operation forbidden: %s", p->ro_message);
        return 0;
    }
    snprintf(msg, len, "operation forbidden: read only access prevents %s",
             p->api ? p->api : p->name);
    return 0;
}
