/* A connection: one socket (plain, TLS, or under a SASL security layer) carrying libvirt
 * packets, for the client side and the upstream side alike (pgbouncer's sbuf, twemproxy's
 * conn). It owns the bufferevent, the framing (length word checked before anything is
 * buffered), pausing and resuming input, and the filter swap when a SASL layer starts. Its
 * owner (a session or a link) gets packets and events through the ops it gave.
 *
 *   socket --read--> frames --ops->packet(h, pkt)--> owner
 *   owner --conn_output()--> evbuffer --write--> socket --low mark--> ops->drained
 */
#ifndef VM_CONN_H
#define VM_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "fwd.h"
#include "wire.h"

struct bufferevent;
struct evbuffer;
struct evbuffer_cb_info;
struct vm_conn;

struct vm_conn_ops {
    /* One whole packet, alone in `pkt` (the owner may move it out). Return 0 to go on with
     * the next, -1 to stop: the owner closed the connection (it is freed) or paused it. */
    int (*packet)(void *owner, struct vm_conn *c, const struct vm_hdr *h, struct evbuffer *pkt);
    /* Bytes the owner reads itself before framing starts (conn_expect_raw), e.g. libvirt's
     * TLS confirmation byte. 1: done, frames follow; 0: wait for more; -1: closed. Optional. */
    int (*raw)(void *owner, struct vm_conn *c, struct evbuffer *in);
    /* The output fell to the low mark. Optional. */
    void (*drained)(void *owner, struct vm_conn *c);
    /* BEV_EVENT_* from the bufferevent (connected, EOF, error, timeout). */
    void (*event)(void *owner, struct vm_conn *c, short what);
    /* An illegal length word (its four bytes): the owner must close. */
    void (*bad_length)(void *owner, struct vm_conn *c, const uint8_t word[4]);
};

/* How the connection writes. A plain socket is written by the connection itself: output
 * appended anywhere during a loop turn is written once, at the end of the turn, with one
 * writev, and write interest is registered only when a write was short. TLS (and later a
 * SASL layer) leave writing to the bufferevent. */
enum {
    VM_CONN_PLAIN = 1,     /* `bev` is a plain socket bufferevent */
    VM_CONN_CONNECTED = 2, /* its socket is connected already (accepted) */
};

/* Take over `bev` (freed with the connection) and start reading. */
struct vm_conn *conn_new(struct bufferevent *bev, const struct vm_conn_ops *ops, void *owner,
                         int flags);
/* Close the socket and free the connection now. Never touch `c` after this. */
void conn_free(struct vm_conn *c);

/* Add the length of every packet read and every byte queued for writing to `bytes` (not
 * owned; it must outlive the connection), above any TLS or SASL layer. */
struct vm_bytes;
void conn_count_bytes(struct vm_conn *c, struct vm_bytes *bytes);
struct evbuffer *conn_output(struct vm_conn *c);
size_t conn_output_length(const struct vm_conn *c);
/* The bufferevent on top (TLS state, timeouts, connect). Changes when a filter is pushed. */
struct bufferevent *conn_bev(struct vm_conn *c);
/* ops->drained is called when the output falls to `low` bytes. */
void conn_set_low_mark(struct vm_conn *c, size_t low);
/* Watch what enters and leaves the output buffer (kept across filter swaps). */
void conn_watch_output(struct vm_conn *c,
                       void (*cb)(struct evbuffer *, const struct evbuffer_cb_info *, void *),
                       void *arg);

/* Stop reading (the kernel then pushes back on the peer), or resume: frames already
 * buffered are handled from the loop, never inside the caller. */
void conn_pause(struct vm_conn *c, int paused);
int conn_paused(const struct vm_conn *c);
/* Drop `n` raw bytes before the next frame (FD-passing dummy bytes). */
void conn_skip(struct vm_conn *c, size_t n);
/* Hand input to ops->raw until it says it is done. */
void conn_expect_raw(struct vm_conn *c);

/* Put a filter over the socket (the SASL security layer): `wrap` returns a bufferevent
 * reading and writing through the current one, or NULL (-1; nothing changed). From the next
 * byte on both directions go through it. */
int conn_push_filter(struct vm_conn *c,
                     struct bufferevent *(*wrap)(void *arg, struct bufferevent *under),
                     void *arg) VM_WUR;

#endif
