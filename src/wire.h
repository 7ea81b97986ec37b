/* The libvirt RPC wire codec: framing, the 28-byte header, a small XDR reader/writer, and the
 * packets the gateway makes itself (local replies, libvirt error replies, keepalive).
 *
 *   packet = len:u32 (counts itself) | prog | vers | proc | type | serial | status | payload
 *
 * Everything is big-endian. Only the header and a few payloads are ever parsed; the rest of a
 * packet is moved between evbuffers untouched. */
#ifndef VM_WIRE_H
#define VM_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "fwd.h"

struct evbuffer;

#define VM_PROG_REMOTE 0x20008086u
#define VM_PROG_QEMU 0x20008087u
#define VM_PROG_LXC 0x00068000u
#define VM_PROG_KEEPALIVE 0x6b656570u
#define VM_PROG_VERSION 1u

#define VM_HDR_LEN 28u                  /* length word + six header words */
#define VM_MSG_MAX 33554432u            /* header + payload */
#define VM_LEN_MAX (VM_MSG_MAX + 4u)    /* largest legal length word */
#define VM_STRING_MAX 4194304u

enum vm_msg_type {
    VM_CALL = 0,
    VM_REPLY = 1,
    VM_MESSAGE = 2,
    VM_STREAM = 3,
    VM_CALL_WITH_FDS = 4,
    VM_REPLY_WITH_FDS = 5,
    VM_STREAM_HOLE = 6,
};

enum vm_msg_status { VM_STATUS_OK = 0, VM_STATUS_ERROR = 1, VM_STATUS_CONTINUE = 2 };

/* libvirt error numbers and domains the gateway reports (include/libvirt/virterror.h). */
enum {
    VIR_ERR_INTERNAL_ERROR = 1,
    VIR_ERR_NO_SUPPORT = 3,
    VIR_ERR_NO_CONNECT = 5,
    VIR_ERR_INVALID_ARG = 8,
    VIR_ERR_OPERATION_FAILED = 9,
    VIR_ERR_OPERATION_DENIED = 29,
    VIR_ERR_RPC = 39,
    VIR_ERR_AUTH_FAILED = 45,
    VIR_ERR_OPERATION_INVALID = 55,
    VIR_ERR_OPERATION_TIMEOUT = 68,
    VIR_ERR_ACCESS_DENIED = 88,
};
enum { VIR_FROM_NONE = 0, VIR_FROM_RPC = 7, VIR_FROM_REMOTE = 13, VIR_FROM_ACCESS = 55 };

struct vm_hdr {
    uint32_t len; /* whole packet, length word included */
    uint32_t prog;
    uint32_t vers;
    int32_t proc;
    uint32_t type;
    uint32_t serial;
    uint32_t status;
};

/* Is `len` (a length word as read) acceptable? Checked before anything is buffered. */
int wire_len_ok(uint32_t len);

/* Frame extraction: 1 when a whole packet of length *len is at the front of `in`, 0 when more
 * bytes are needed, -1 when the length word is illegal (the peer must be closed). */
int wire_frame_ready(struct evbuffer *in, uint32_t *len) VM_WUR;

void wire_hdr_decode(const uint8_t raw[VM_HDR_LEN], struct vm_hdr *h);
void wire_hdr_encode(const struct vm_hdr *h, uint8_t raw[VM_HDR_LEN]);

/* Read the header of the packet at the front of `pkt` (which holds at least VM_HDR_LEN). */
void wire_hdr_peek(struct evbuffer *pkt, struct vm_hdr *h);

/* Rewrite the serial of the packet held in `pkt`, in place. */
void wire_set_serial(struct evbuffer *pkt, uint32_t serial);

/* --- XDR writer: a growable flat buffer. Allocation failure aborts the process. --- */
struct xbuf {
    uint8_t *p;
    size_t len, cap;
};
void xb_init(struct xbuf *b);
void xb_free(struct xbuf *b);
void xb_u32(struct xbuf *b, uint32_t v);
void xb_i32(struct xbuf *b, int32_t v);
void xb_bytes(struct xbuf *b, const void *data, size_t n); /* raw, no length, padded */
void xb_string(struct xbuf *b, const char *s);              /* XDR string */
void xb_opt_string(struct xbuf *b, const char *s);          /* presence flag + string; NULL = absent */
/* libvirt's SASL token pair `int nil; char data<>`: nil=1 when data is NULL, and each char
 * takes four wire bytes (XDR char is an int). */
void xb_nil_chars(struct xbuf *b, const void *data, unsigned len);

/* --- XDR reader over a flat buffer. Errors are sticky: check `err` once at the end. --- */
struct xrd {
    const uint8_t *p;
    size_t len, off;
    int err;
};
void xr_init(struct xrd *r, const void *p, size_t len);
uint32_t xr_u32(struct xrd *r);
int32_t xr_i32(struct xrd *r);
/* A string, returned malloc'd and NUL terminated (NULL on error). Strings containing NUL or
 * longer than `max` are errors. */
char *xr_string(struct xrd *r, size_t max);
/* Optional string: *present is set; returns NULL when absent or on error. */
char *xr_opt_string(struct xrd *r, size_t max, int *present);
/* Step over a string without copying it. */
void xr_skip_string(struct xrd *r);
/* The `int nil; char data<>` pair into buf (at most cap chars); -1 on error or overflow. */
int xr_nil_chars(struct xrd *r, void *buf, size_t cap, unsigned *len, int *nil);

/* --- Packets the gateway makes. Each appends one whole packet to `out`. --- */

/* A packet with the given header fields and payload; the length is computed. */
void wire_put_packet(struct evbuffer *out, uint32_t prog, int32_t proc, uint32_t type,
                     uint32_t serial, uint32_t status, const void *payload, size_t n);
/* A successful REPLY to `call` carrying `payload`. */
void wire_put_reply(struct evbuffer *out, const struct vm_hdr *call, const void *payload, size_t n);
/* An error REPLY to `call` in the virNetMessageError layout. `message` is the full text the
 * client prints, prefix included (e.g. "operation timed out: ..."). */
void wire_put_error(struct evbuffer *out, const struct vm_hdr *call, int code, int domain,
                    const char *message);
/* The same with libvirt's str1 (the message format) and str2 (its detail), as drivers send
 * them; NULL = absent. */
void wire_put_error_full(struct evbuffer *out, const struct vm_hdr *call, int code, int domain,
                         const char *message, const char *str1, const char *str2);
/* Encode a virNetMessageError payload (used by wire_put_error and tests). */
void wire_error_payload(struct xbuf *b, int code, int domain, const char *message);
/* Keepalive PING or PONG (proc VM_PROC_KEEPALIVE_PING/PONG). */
void wire_put_keepalive(struct evbuffer *out, int proc);

/* Decode code/domain/message of an error payload; message copied into buf (may be ""). */
int wire_error_decode(const void *payload, size_t n, int *code, int *domain, char *buf,
                      size_t buflen);

#endif
