/* TLS with OpenSSL, as libvirt speaks it: a normal TLS handshake, then the server checks the
 * client certificate (and the DN allowlist) and writes ONE byte 0x01 inside TLS before any RPC;
 * on failure it closes without writing. The client side (upstream links) reads that byte.
 *
 * DN strings are in libvirt's (GnuTLS's) order, e.g. "C=GB,O=Test,CN=client1": the RDNs in
 * certificate order, which is the reverse of OpenSSL's RFC 2253 output. */
#ifndef VM_TLS_H
#define VM_TLS_H

#include <stddef.h>

#include "fwd.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

struct vm_tls_cfg;

/* A server context from cert/key/CA (and CRL) files. NULL after logging why. Reloading is
 * building a new context and swapping it in: sessions keep the one they started with. */
SSL_CTX *tls_server_ctx(const struct vm_tls_cfg *cfg, char *err, size_t errlen);
/* A client context for an upstream (CA to verify libvirtd, optional client cert/key). */
SSL_CTX *tls_client_ctx(const struct vm_tls_cfg *cfg, char *err, size_t errlen);
void tls_ctx_free(SSL_CTX *ctx);

/* After the handshake on a server SSL: check the peer certificate per `cfg` (required or
 * optional, allowlist). Returns 0 and fills dn (may be "" when no certificate and optional),
 * or -1 with the reason. */
int tls_check_client(SSL *ssl, const struct vm_tls_cfg *cfg, char *dn, size_t dnlen, char *err,
                     size_t errlen);
/* The subject DN of the peer certificate in libvirt's order; "" when none. */
void tls_peer_dn(SSL *ssl, char *dn, size_t len);
/* Does `dn` match one of the glob patterns (NULL-terminated; NULL list = any)? */
int tls_dn_allowed(char *const *patterns, const char *dn);

#endif
