/* Fuzz the PROXY protocol v2 parser (proxyproto_parse) the way the listener drives it: bytes
 * arrive in pieces, the parser says how many it needs, and it never reads past what it was
 * given. Input: the raw bytes a load balancer (or an attacker) sends first. */
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "proxyproto.h"

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* As the listener does: first the fixed part, then what `need` says, never more. */
    size_t have = size < VM_PROXY_FIXED_LEN ? size : VM_PROXY_FIXED_LEN;
    for (;;) {
        /* A copy of exactly `have` bytes: ASan catches any read beyond. */
        uint8_t *buf = malloc(have ? have : 1);
        REQUIRE(buf);
        memcpy(buf, data, have);
        struct vm_proxy_hdr h;
        size_t need = 0;
        const char *why = NULL;
        int rc = proxyproto_parse(buf, have, &h, &need, &why);
        free(buf);
        if (rc < 0) {
            REQUIRE(why && why[0]);
            return 0;
        }
        if (rc == 1) {
            REQUIRE(h.len >= VM_PROXY_FIXED_LEN && h.len <= VM_PROXY_MAX_LEN && h.len <= have);
            REQUIRE(!(h.local && h.has_addr));
            if (h.has_addr)
                REQUIRE(h.src.ss_family == AF_INET || h.src.ss_family == AF_INET6);
            return 0;
        }
        REQUIRE(rc == 0 && need > have && need <= VM_PROXY_MAX_LEN);
        if (need > size)
            return 0; /* the peer stopped sending: the listener's timeout ends it */
        have = need;
    }
}
