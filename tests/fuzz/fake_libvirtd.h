/* A small in-process libvirtd for the session fuzzer: it listens on a unix socket in the
 * harness' event loop and answers the gateway's upstream links the way libvirtd would, just
 * enough to get calls through: the handshake (AUTH_LIST none, features, CONNECT_OPEN), every
 * other call with an empty OK reply (or an error), event registrations with fresh callback
 * ids, stream creation with OK and stream packets with their end. The fuzzer can also make
 * it send events, raw bytes, or hang up. */
#ifndef VM_FAKE_LIBVIRTD_H
#define VM_FAKE_LIBVIRTD_H

#include <stddef.h>
#include <stdint.h>

struct event_base;
struct fake_libvirtd;

/* Listen on `path` (removed first). NULL on failure. */
struct fake_libvirtd *fake_libvirtd_new(struct event_base *base, const char *path);
/* Close every connection and the listener. */
void fake_libvirtd_free(struct fake_libvirtd *f);

/* Connections accepted so far and still open. */
int fake_libvirtd_nconns(const struct fake_libvirtd *f);
/* Ordinary calls answered so far (handshake and event calls not counted). */
unsigned fake_libvirtd_calls(const struct fake_libvirtd *f);
/* Answer ordinary calls with `n` payload bytes instead of none. */
void fake_libvirtd_reply_bytes(struct fake_libvirtd *f, size_t n);
/* Every `every`-th ordinary call is answered with an error instead (0: never). */
void fake_libvirtd_fail_every(struct fake_libvirtd *f, unsigned every);
/* Send an event for one of the registrations made so far (chosen by `pick`): the `which`-th
 * callback event procedure of the registration's program (not always of its family), payload
 * = its callback id then `extra`. Nothing when no registration exists. */
void fake_libvirtd_event(struct fake_libvirtd *f, unsigned pick, unsigned which,
                         const uint8_t *extra, size_t n);
/* Write raw bytes on connection `pick` (modulo the open ones). */
void fake_libvirtd_raw(struct fake_libvirtd *f, unsigned pick, const uint8_t *data, size_t n);
/* Hang up connection `pick`, as a dying libvirtd would. */
void fake_libvirtd_drop(struct fake_libvirtd *f, unsigned pick);
/* Hang up every connection. */
void fake_libvirtd_drop_all(struct fake_libvirtd *f);

#endif
