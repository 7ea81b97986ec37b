/* Fuzz the frame parser and the header codec.
 *
 * Input: byte 0 seeds the chunk sizes, the rest is a byte stream as a peer would send it. The
 * stream reaches an evbuffer in chunks of 1..64 bytes, each chunk its own buffer chain (moved
 * in with evbuffer_add_buffer, as bufferevents do), and packets are cut out exactly as
 * session.c and upstream.c cut them. Every whole packet must then satisfy what the rest of
 * the engine relies on: the length word is legal and equals the bytes removed, the header
 * round-trips through decode/encode, and a serial rewrite changes nothing but the serial. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "fuzz.h"
#include "wire.h"

static void check_header_roundtrip(const uint8_t raw[VM_HDR_LEN])
{
    struct vm_hdr h;
    uint8_t again[VM_HDR_LEN];
    wire_hdr_decode(raw, &h);
    wire_hdr_encode(&h, again);
    if (memcmp(raw, again, VM_HDR_LEN) != 0)
        abort();
}

/* The serial rewrite touches the serial word and nothing else, even when the header spans
 * several chains. */
static void check_serial_rewrite(struct evbuffer *pkt, uint32_t len, uint32_t serial)
{
    struct vm_hdr before, after;
    wire_hdr_peek(pkt, &before);
    wire_set_serial(pkt, serial);
    wire_hdr_peek(pkt, &after);
    before.serial = serial;
    if (memcmp(&before, &after, sizeof(before)) != 0 || evbuffer_get_length(pkt) != len)
        abort();
}

/* What every caller does with a reply payload that claims to be an error. */
static void check_error_payload(struct evbuffer *pkt, uint32_t len)
{
    const uint8_t *raw = evbuffer_pullup(pkt, -1);
    int code, domain;
    char msg[512];
    msg[0] = 'x';
    if (wire_error_decode(raw + VM_HDR_LEN, len - VM_HDR_LEN, &code, &domain, msg,
                          sizeof(msg)) == 0 && strlen(msg) >= sizeof(msg))
        abort();
    /* A one-byte buffer must still get its terminator. */
    char tiny[1] = {'x'};
    if (wire_error_decode(raw + VM_HDR_LEN, len - VM_HDR_LEN, &code, &domain, tiny, 1) == 0 &&
        tiny[0] != '\0')
        abort();
}

/* Cut whole packets out of `in`; returns -1 when the peer would be closed. */
static int drain_frames(struct evbuffer *in, uint32_t *serial)
{
    for (;;) {
        uint32_t len = 0;
        int r = wire_frame_ready(in, &len);
        if (r < 0) {
            uint8_t w[4];
            evbuffer_copyout(in, w, 4);
            uint32_t word = (uint32_t)w[0] << 24 | (uint32_t)w[1] << 16 | (uint32_t)w[2] << 8 | w[3];
            if (wire_len_ok(word))
                abort();
            return -1;
        }
        if (r == 0)
            return 0;
        if (!wire_len_ok(len) || evbuffer_get_length(in) < len)
            abort();
        struct evbuffer *pkt = evbuffer_new();
        if (!pkt)
            abort();
        if (evbuffer_remove_buffer(in, pkt, len) != (int)len)
            abort();
        struct vm_hdr h;
        wire_hdr_peek(pkt, &h);
        if (h.len != len)
            abort();
        uint8_t raw[VM_HDR_LEN];
        evbuffer_copyout(pkt, raw, sizeof(raw));
        check_header_roundtrip(raw);
        check_serial_rewrite(pkt, len, (*serial)++ * 2654435761u);
        if (h.type == VM_REPLY && h.status == VM_STATUS_ERROR)
            check_error_payload(pkt, len);
        evbuffer_free(pkt);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint32_t rnd = data[0] * 16777619u + 2166136261u;
    data++;
    size--;

    struct evbuffer *in = evbuffer_new();
    struct evbuffer *chunk = evbuffer_new();
    if (!in || !chunk)
        abort();
    uint32_t serial = 1;
    size_t off = 0;
    while (off < size) {
        rnd ^= rnd << 13;
        rnd ^= rnd >> 17;
        rnd ^= rnd << 5;
        size_t k = 1 + rnd % 64;
        if (k > size - off)
            k = size - off;
        evbuffer_add(chunk, data + off, k);
        evbuffer_add_buffer(in, chunk);
        off += k;
        if (drain_frames(in, &serial) < 0)
            break;
    }
    evbuffer_free(chunk);
    evbuffer_free(in);
    return 0;
}
