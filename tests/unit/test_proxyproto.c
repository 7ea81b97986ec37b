/* PROXY protocol v2 parser: golden headers as HAProxy sends them, partial input, and garbled or
 * hostile headers, each refused with a reason. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>

#include "check.h"
#include "proxyproto.h"

#define SIG "0d0a0d0a 000d0a51 5549540a"

static int parse_hex(const char *hex, struct vm_proxy_hdr *h, size_t *need, const char **why)
{
    unsigned char buf[2048];
    size_t n = hex_bytes(hex, buf, sizeof(buf));
    *need = 0;
    *why = NULL;
    return proxyproto_parse(buf, n, h, need, why);
}

static const char *src_str(const struct vm_proxy_hdr *h, char *buf, size_t len, int *port)
{
    if (h->src.ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)&h->src;
        *port = ntohs(in->sin_port);
        return inet_ntop(AF_INET, &in->sin_addr, buf, (socklen_t)len);
    }
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&h->src;
    *port = ntohs(in6->sin6_port);
    return inet_ntop(AF_INET6, &in6->sin6_addr, buf, (socklen_t)len);
}

int main(void)
{
    struct vm_proxy_hdr h;
    size_t need;
    const char *why;
    char addr[64];
    int port;

    /* PROXY TCP4 192.0.2.7:40000 -> 10.0.0.1:16509, as HAProxy's send-proxy-v2 writes it. */
    const char *v4 = SIG " 21 11 000c c0000207 0a000001 9c40 407d";
    CHECK(parse_hex(v4, &h, &need, &why) == 1);
    CHECK(h.len == 28 && !h.local && h.has_addr);
    CHECK_STR(src_str(&h, addr, sizeof(addr), &port), "192.0.2.7");
    CHECK(port == 40000);
    CHECK(((struct sockaddr_in *)&h.dst)->sin_port == htons(16509));

    /* Extra bytes after the header (the client's first packet) are not the parser's. */
    CHECK(parse_hex(SIG " 21 11 000c c0000207 0a000001 9c40 407d 0000001c 20008086", &h, &need,
                    &why) == 1);
    CHECK(h.len == 28);

    /* TCP6 with a TLV (PP2_TYPE_AUTHORITY "h") after the addresses: skipped. */
    CHECK(parse_hex(SIG " 21 21 0028 20010db8000000000000000000000001 00000000000000000000000000000001"
                    " 1f90 407d 02 0001 68", &h, &need, &why) == 1);
    CHECK(h.len == 56 && h.has_addr);
    CHECK_STR(src_str(&h, addr, sizeof(addr), &port), "2001:db8::1");
    CHECK(port == 8080);

    /* LOCAL (the balancer's own health check): no address, the socket's peer stands. */
    CHECK(parse_hex(SIG " 20 00 0000", &h, &need, &why) == 1);
    CHECK(h.local && !h.has_addr && h.len == 16);
    /* LOCAL may still carry an address block: ignored. */
    CHECK(parse_hex(SIG " 20 11 000c c0000207 0a000001 9c40 407d", &h, &need, &why) == 1);
    CHECK(h.local && !h.has_addr && h.len == 28);
    /* PROXY with UNSPEC or UNIX family: accepted, the socket's peer stands. */
    CHECK(parse_hex(SIG " 21 00 0000", &h, &need, &why) == 1);
    CHECK(!h.local && !h.has_addr);

    /* Partial input: the parser asks for the fixed part, then the body. */
    CHECK(parse_hex("", &h, &need, &why) == 0 && need == 16);
    CHECK(parse_hex("0d0a0d", &h, &need, &why) == 0 && need == 16);
    CHECK(parse_hex(SIG " 21 11 000c c000", &h, &need, &why) == 0 && need == 28);

    /* Refusals, each with a reason, decided as early as possible. */
    CHECK(parse_hex("00", &h, &need, &why) == -1 && why); /* a libvirt length word */
    CHECK(parse_hex("0000001c", &h, &need, &why) == -1 && why);
    CHECK(parse_hex("16030100", &h, &need, &why) == -1 && why); /* a TLS ClientHello */
    CHECK(parse_hex("50524f5859205443503420", &h, &need, &why) == -1); /* "PROXY TCP4 " */
    CHECK(why && strstr(why, "v1"));
    CHECK(parse_hex(SIG " 11 11 000c", &h, &need, &why) == -1 && strstr(why, "version"));
    CHECK(parse_hex(SIG " 22 11 000c", &h, &need, &why) == -1 && strstr(why, "command"));
    CHECK(parse_hex(SIG " 21 41 000c", &h, &need, &why) == -1 && strstr(why, "family"));
    CHECK(parse_hex(SIG " 21 13 000c", &h, &need, &why) == -1);
    CHECK(parse_hex(SIG " 21 12 000c c0000207 0a000001 9c40 407d", &h, &need, &why) == -1);
    CHECK(why && strstr(why, "stream")); /* UDP source */
    CHECK(parse_hex(SIG " 21 11 ffff", &h, &need, &why) == -1 && strstr(why, "too long"));
    CHECK(parse_hex(SIG " 21 11 03f1", &h, &need, &why) == -1); /* 16 + 1009 > 1024 */
    CHECK(parse_hex(SIG " 21 11 03f0", &h, &need, &why) == 0 && need == 1024);
    CHECK(parse_hex(SIG " 21 11 0008 c0000207 0a000001", &h, &need, &why) == -1);
    CHECK(why && strstr(why, "too short"));
    CHECK(parse_hex(SIG " 21 21 000c c0000207 0a000001 9c40 407d", &h, &need, &why) == -1);
    /* A TLV whose length runs past the header. */
    CHECK(parse_hex(SIG " 21 11 0010 c0000207 0a000001 9c40 407d 02 0005 68", &h, &need,
                    &why) == -1 && strstr(why, "TLV"));
    CHECK(parse_hex(SIG " 21 11 000e c0000207 0a000001 9c40 407d 02 00", &h, &need, &why) == -1);
    return check_done();
}
