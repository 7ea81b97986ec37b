/* Fuzz object grants: the call check, the reply filter and the event check of src/grant.c,
 * which read client- and libvirtd-supplied XDR (and XML) for every call of a session with a
 * grant. Input: a procedure selector (2 bytes, an index into the procedures that name
 * objects), a flags byte (which families are limited; whether the first part is a call the
 * session sends or a reply), then the bytes: for a call, its arguments; for a reply, first
 * the call's arguments up to a 0xff 0xff 0xff 0xff separator, then the reply payload.
 * Checked: every call gets a verdict, a FILTER call's reply becomes exactly one whole packet
 * with the call's serial and procedure, a REFUSED one a libvirt error, and nothing leaks. */
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "fuzz.h"
#include "grant.h"
#include "xmlname.h"
#include "proc.h"
#include "wire.h"

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static char *doms[] = {"web-*", "!web-secret", NULL};
static char *nets[] = {"net-a*", NULL};
static char *pools[] = {"pool-[ab]", NULL};
static const struct vm_proc_info *named[512];
static size_t nnamed;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    for (size_t i = 0; i < vm_proc_table_len && nnamed < 512; i++) {
        const struct vm_proc_info *p = &vm_proc_table[i];
        for (int f = 0; f < VM_OBJ_FAMILIES; f++)
            if (p->objects[f] != VM_OBJ_NONE) {
                named[nnamed++] = p;
                break;
            }
    }
    return 0;
}

static const uint8_t *find_sep(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 4 <= n; i++)
        if (p[i] == 0xff && p[i + 1] == 0xff && p[i + 2] == 0xff && p[i + 3] == 0xff)
            return p + i;
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3 || size > 1 << 20 || !nnamed)
        return 0;
    const struct vm_proc_info *info = named[(data[0] << 8 | data[1]) % nnamed];
    uint8_t flags = data[2];
    data += 3;
    size -= 3;
    struct vm_grant *g = grant_new((flags & 1) ? doms : NULL, (flags & 2) ? nets : NULL,
                                   (flags & 4) ? pools : NULL,
                                   (flags & 8) ? "test:///default" : "qemu:///system");
    if (!g)
        return 0;
    /* XML names, on the raw bytes */
    free(xmlname_of((const char *)data, size, (flags & 16) ? "domain" : "pool"));

    const uint8_t *args = data, *reply = NULL;
    size_t nargs = size, nreply = 0;
    const uint8_t *sep = find_sep(data, size);
    if (sep) {
        nargs = (size_t)(sep - data);
        reply = sep + 4;
        nreply = size - nargs - 4;
    }
    struct evbuffer *pkt = evbuffer_new(), *out = evbuffer_new(), *rep = evbuffer_new();
    REQUIRE(pkt && out && rep);
    wire_put_packet(pkt, info->prog, info->proc, VM_CALL, 77, VM_STATUS_OK, args, nargs);
    struct vm_hdr call;
    wire_hdr_peek(pkt, &call);
    struct vm_grant_memo memo;
    struct vm_grant_error err;
    enum vm_grant_verdict v = grant_check_call(g, info, pkt, &memo, &err);
    if (v == VM_GRANT_REFUSED) {
        REQUIRE(err.code > 0 && memo.note == NULL);
        wire_put_error_full(out, &call, err.code, err.domain, err.message,
                            err.str1[0] ? err.str1 : NULL, err.str2[0] ? err.str2 : NULL);
    } else {
        /* what goes upstream is still one whole packet */
        struct vm_hdr up;
        REQUIRE(evbuffer_get_length(pkt) >= VM_HDR_LEN);
        wire_hdr_peek(pkt, &up);
        REQUIRE(up.len == evbuffer_get_length(pkt) && up.serial == 77);
        if (v == VM_GRANT_FILTER && reply) {
            wire_put_packet(rep, info->prog, up.proc, VM_REPLY, 999,
                            (flags & 32) ? VM_STATUS_ERROR : VM_STATUS_OK, reply, nreply);
            grant_filter_reply(g, info, &memo, &call, rep, out);
            REQUIRE(evbuffer_get_length(rep) == 0);
            struct vm_hdr oh;
            REQUIRE(evbuffer_get_length(out) >= VM_HDR_LEN);
            wire_hdr_peek(out, &oh);
            REQUIRE(oh.len == evbuffer_get_length(out));
            REQUIRE(oh.serial == 77 && oh.proc == info->proc && oh.type == VM_REPLY);
        }
        free(memo.note);
    }
    /* and the same bytes as an event about an object */
    evbuffer_drain(pkt, evbuffer_get_length(pkt));
    wire_put_packet(pkt, info->prog, info->proc, VM_MESSAGE, 0, VM_STATUS_OK, data, size);
    const uint8_t *ev = evbuffer_pullup(pkt, -1);
    (void)grant_event_allowed(g, info, ev, evbuffer_get_length(pkt));
    evbuffer_free(pkt);
    evbuffer_free(out);
    evbuffer_free(rep);
    grant_free(g);
    return 0;
}
