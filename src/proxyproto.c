#include "proxyproto.h"

#include <netinet/in.h>
#include <string.h>

static const uint8_t signature[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                      0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

enum { CMD_LOCAL = 0x0, CMD_PROXY = 0x1 };
enum { FAM_UNSPEC = 0x0, FAM_INET = 0x1, FAM_INET6 = 0x2, FAM_UNIX = 0x3 };
enum { TR_UNSPEC = 0x0, TR_STREAM = 0x1, TR_DGRAM = 0x2 };

static int fail(const char **why, const char *text)
{
    *why = text;
    return -1;
}

/* TLVs (type, u16 length, value) are skipped, but one running past the header means the
 * length word or the TLVs are garbled. */
static int tlvs_fit(const uint8_t *p, size_t n)
{
    while (n > 0) {
        if (n < 3)
            return 0;
        size_t vlen = (size_t)p[1] << 8 | p[2];
        if (vlen > n - 3)
            return 0;
        p += 3 + vlen;
        n -= 3 + vlen;
    }
    return 1;
}

static void set_inet(struct sockaddr_storage *ss, const uint8_t *addr, const uint8_t *port)
{
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    memset(ss, 0, sizeof(*ss));
    in->sin_family = AF_INET;
    memcpy(&in->sin_addr, addr, 4);
    memcpy(&in->sin_port, port, 2); /* both in network order already */
}

static void set_inet6(struct sockaddr_storage *ss, const uint8_t *addr, const uint8_t *port)
{
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    memset(ss, 0, sizeof(*ss));
    in6->sin6_family = AF_INET6;
    memcpy(&in6->sin6_addr, addr, 16);
    memcpy(&in6->sin6_port, port, 2);
}

int proxyproto_parse(const uint8_t *buf, size_t len, struct vm_proxy_hdr *out, size_t *need,
                     const char **why)
{
    size_t sig = len < sizeof(signature) ? len : sizeof(signature);
    if (memcmp(buf, signature, sig) != 0) {
        if (len >= 5 && memcmp(buf, "PROXY", 5) == 0)
            return fail(why, "PROXY protocol v1 (text) header: only v2 is accepted");
        return fail(why, "no PROXY protocol v2 signature");
    }
    if (len < VM_PROXY_FIXED_LEN) {
        *need = VM_PROXY_FIXED_LEN;
        return 0;
    }
    unsigned version = buf[12] >> 4, cmd = buf[12] & 0xF;
    unsigned family = buf[13] >> 4, transport = buf[13] & 0xF;
    size_t body = (size_t)buf[14] << 8 | buf[15];
    if (version != 2)
        return fail(why, "PROXY protocol version is not 2");
    if (cmd != CMD_LOCAL && cmd != CMD_PROXY)
        return fail(why, "unknown PROXY protocol command");
    if (family > FAM_UNIX || transport > TR_DGRAM)
        return fail(why, "unknown PROXY protocol address family or transport");
    if (VM_PROXY_FIXED_LEN + body > VM_PROXY_MAX_LEN)
        return fail(why, "PROXY protocol header too long");
    if (len < VM_PROXY_FIXED_LEN + body) {
        *need = VM_PROXY_FIXED_LEN + body;
        return 0;
    }
    /* Address block size per family; the rest of the body is TLVs. */
    static const size_t addr_len[] = {0, 12, 36, 216};
    size_t alen = addr_len[family];
    if (body < alen)
        return fail(why, "PROXY protocol header too short for its address family");
    const uint8_t *a = buf + VM_PROXY_FIXED_LEN;
    if (!tlvs_fit(a + alen, body - alen))
        return fail(why, "PROXY protocol TLVs run past the header");
    memset(out, 0, sizeof(*out));
    out->len = VM_PROXY_FIXED_LEN + body;
    if (cmd == CMD_LOCAL) {
        out->local = 1; /* the balancer's own connection (health check): addresses ignored */
        return 1;
    }
    if (family == FAM_INET || family == FAM_INET6) {
        /* A virtmux client is a stream; a datagram source cannot be one. */
        if (transport != TR_STREAM)
            return fail(why, "PROXY protocol transport is not a stream");
        if (family == FAM_INET) {
            set_inet(&out->src, a, a + 8);
            set_inet(&out->dst, a + 4, a + 10);
        } else {
            set_inet6(&out->src, a, a + 32);
            set_inet6(&out->dst, a + 16, a + 34);
        }
        out->has_addr = 1;
    }
    /* UNSPEC and UNIX sources: no address worth having; the socket's peer stands, as the
     * protocol asks of a receiver. */
    return 1;
}
