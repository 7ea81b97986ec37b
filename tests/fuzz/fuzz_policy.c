/* Fuzz the read-only decision that guards every call of a read-only session: a whole CALL
 * packet (header words taken from the input, argument bytes as the client sent them) goes
 * through policy_readonly_allows, as session.c does before anything is forwarded.
 * Input: prog selector (1 byte), proc (2 bytes), then the argument bytes. */
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "fuzz.h"
#include "policy.h"
#include "proc.h"
#include "wire.h"

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static const uint32_t progs[] = {VM_PROG_REMOTE, VM_PROG_QEMU, VM_PROG_LXC, 0x12345678u};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3 || size > VM_MSG_MAX - VM_HDR_LEN)
        return 0;
    uint32_t prog = progs[data[0] % 4];
    int32_t proc = (int32_t)(data[1] << 8 | data[2]);
    const uint8_t *args = data + 3;
    size_t n = size - 3;

    /* The packet as a client would cut it: header chain first, arguments in a second chain
     * (evbuffer_remove_buffer keeps the chains of the socket read). */
    struct evbuffer *pkt = evbuffer_new();
    struct evbuffer *tail = evbuffer_new();
    REQUIRE(pkt && tail);
    wire_put_packet(pkt, prog, proc, VM_CALL, 7, VM_STATUS_OK, NULL, 0);
    evbuffer_add(tail, args, n);
    evbuffer_add_buffer(pkt, tail);
    uint8_t raw[VM_HDR_LEN];
    evbuffer_copyout(pkt, raw, sizeof(raw));
    raw[0] = (uint8_t)((VM_HDR_LEN + n) >> 24);
    raw[1] = (uint8_t)((VM_HDR_LEN + n) >> 16);
    raw[2] = (uint8_t)((VM_HDR_LEN + n) >> 8);
    raw[3] = (uint8_t)(VM_HDR_LEN + n);
    struct vm_hdr h;
    wire_hdr_decode(raw, &h);

    char msg[512];
    int domain = -1;
    int ok = policy_readonly_allows(&h, pkt, msg, sizeof(msg), &domain);
    const struct vm_proc_info *p = vm_proc_lookup(prog, proc);
    if (ok) {
        /* Only known REMOTE procedures ever pass, and only read-only or flag-decided ones. */
        REQUIRE(p && prog == VM_PROG_REMOTE && p->ro != VM_RO_NO);
    } else {
        REQUIRE(strncmp(msg, "operation forbidden: ", 21) == 0 && domain >= 0);
    }
    if (p && prog == VM_PROG_REMOTE && p->ro == VM_RO_YES)
        REQUIRE(ok);
    /* The decision reads the packet; it must not consume or change it. */
    REQUIRE(evbuffer_get_length(pkt) == VM_HDR_LEN + n);
    const uint8_t *after = evbuffer_pullup(pkt, -1);
    REQUIRE(n == 0 || memcmp(after + VM_HDR_LEN, args, n) == 0);
    evbuffer_free(pkt);
    evbuffer_free(tail);
    return 0;
}
