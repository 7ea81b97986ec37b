/* Client authentication at the gateway: SASL (cyrus-sasl, service "libvirt") with libvirt's
 * AUTH_SASL_INIT/START/STEP procedures, the SASL security layer on plain TCP, and the failure
 * rate limit per source (TCP address or unix uid). TLS certificate checks live in tls.c,
 * unix peer credentials in listener.c; all three end in the session's immutable identity.
 *
 *   AUTH_LIST -> [SASL]   AUTH_SASL_INIT -> mechlist   START/STEP ... complete=1
 *        -> username allowlist -> identity.sasl_user -> (plain TCP) encode/decode from the
 *           next byte on, both directions
 */
#ifndef VM_AUTH_H
#define VM_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;
struct bufferevent;
struct vm_sasl_cfg;
struct vm_sasl;

/* Once per process, before any SASL session: point cyrus-sasl at the configured sasldb,
 * mechanisms and keytab (never at /etc/sasl2). Returns -1 after logging. */
int auth_global_init(const struct vm_sasl_cfg *cfg) VM_WUR;
void auth_global_done(void);

/* Per-session SASL state. `secure`: TLS or unix (no security layer); `ext_ssf`: TLS key bits;
 * `source`: what the failure rate limit counts against (identity_source). */
struct vm_sasl *auth_new(const struct vm_sasl_cfg *cfg, int secure, int ext_ssf,
                         const char *source);
void auth_free(struct vm_sasl *a);

/* Handle AUTH_SASL_INIT/START/STEP: the reply (or libvirt's auth error) is appended to `out`.
 * Returns 1 when authentication just completed (then auth_user/auth_ssf are valid), 0 to go
 * on, -1 after a failure (already answered). */
int auth_handle(struct vm_sasl *a, const struct vm_hdr *h, const uint8_t *args, size_t n,
                struct evbuffer *out, const char *tag);
const char *auth_user(const struct vm_sasl *a);
/* The mechanism the client named at AUTH_SASL_START (its text, unchecked), or NULL. */
const char *auth_mechanism(const struct vm_sasl *a);
/* The last auth_handle failure was the per-source failure limit (sasl.max_failures). */
int auth_was_limited(const struct vm_sasl *a);
/* Negotiated security strength; > 0 means the stream must be encoded from now on. */
int auth_ssf(const struct vm_sasl *a);
/* Wrap `under` in a filter doing SASL encode/decode with `a` (which must outlive it). */
struct bufferevent *auth_wrap(struct vm_sasl *a, struct bufferevent *under);

/* ---- the gateway authenticating to an upstream libvirtd ---- */
struct vm_sasl_client;
/* Prepare a SASL client for `host` as `user`, password read from `password_file` (never
 * logged). `secure`: TLS or unix (no layer). NULL with a reason. */
struct vm_sasl_client *vmsasl_client_begin(const char *user, const char *password_file,
                                         const char *host, int secure, int ext_ssf, char *err,
                                         size_t errlen);
void vmsasl_client_end(struct vm_sasl_client *c);
/* Choose a mechanism from libvirtd's list and make the first token. 0 or -1. */
int vmsasl_client_first(struct vm_sasl_client *c, const char *mechlist, const char **mech,
                      const char **out, unsigned *outlen, char *err, size_t errlen);
/* Answer a server token. 0 or -1. */
int vmsasl_client_next(struct vm_sasl_client *c, const char *in, unsigned inlen, const char **out,
                     unsigned *outlen, char *err, size_t errlen);
int vmsasl_client_done(const struct vm_sasl_client *c);
/* After completion: check the SSF; returns > 0 when the stream must be wrapped, 0 when not,
 * -1 when too weak. */
int vmsasl_client_layer(struct vm_sasl_client *c, int secure, char *err, size_t errlen);
struct bufferevent *vmsasl_client_wrap(struct vm_sasl_client *c, struct bufferevent *under);

#endif
