#include "tls.h"

#include <errno.h>
#include <fnmatch.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "config.h"

static void ssl_error(char *err, size_t errlen, const char *what, const char *file)
{
    unsigned long e = ERR_get_error();
    char buf[256] = "";
    if (e)
        ERR_error_string_n(e, buf, sizeof(buf));
    snprintf(err, errlen, "%s %s: %s", what, file ? file : "", buf[0] ? buf : "failed");
    ERR_clear_error();
}

/* OpenSSL's own message for a file it cannot open is "system lib"; say why first. */
static int check_file(const char *file, const char *what, char *err, size_t errlen)
{
    if (!file)
        return 0;
    FILE *f = fopen(file, "r");
    if (!f) {
        snprintf(err, errlen, "%s %s: %s", what, file, strerror(errno));
        return -1;
    }
    fclose(f);
    return 0;
}

static int load_common(SSL_CTX *ctx, const struct vm_tls_cfg *cfg, char *err, size_t errlen)
{
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (check_file(cfg->cert, "cannot load certificate", err, errlen) < 0 ||
        check_file(cfg->key, "cannot load key", err, errlen) < 0 ||
        check_file(cfg->ca, "cannot load CA", err, errlen) < 0 ||
        check_file(cfg->crl, "cannot load CRL", err, errlen) < 0)
        return -1;
    if (cfg->cert && SSL_CTX_use_certificate_chain_file(ctx, cfg->cert) != 1) {
        ssl_error(err, errlen, "cannot load certificate", cfg->cert);
        return -1;
    }
    if (cfg->key && SSL_CTX_use_PrivateKey_file(ctx, cfg->key, SSL_FILETYPE_PEM) != 1) {
        ssl_error(err, errlen, "cannot load key", cfg->key);
        return -1;
    }
    if (cfg->cert && cfg->key && SSL_CTX_check_private_key(ctx) != 1) {
        ssl_error(err, errlen, "key does not match certificate", cfg->key);
        return -1;
    }
    if (cfg->ca && SSL_CTX_load_verify_locations(ctx, cfg->ca, NULL) != 1) {
        ssl_error(err, errlen, "cannot load CA", cfg->ca);
        return -1;
    }
    if (cfg->crl) {
        X509_STORE *store = SSL_CTX_get_cert_store(ctx);
        X509_LOOKUP *lk = X509_STORE_add_lookup(store, X509_LOOKUP_file());
        if (!lk || X509_load_crl_file(lk, cfg->crl, X509_FILETYPE_PEM) <= 0) {
            ssl_error(err, errlen, "cannot load CRL", cfg->crl);
            return -1;
        }
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    }
    return 0;
}

static int accept_any(int ok, X509_STORE_CTX *x)
{
    return 1; /* the result stays in SSL_get_verify_result for tls_check_client */
}

static SSL_CTX *new_ctx(const SSL_METHOD *method, const struct vm_tls_cfg *cfg, char *err,
                        size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (!ctx) {
        ssl_error(err, errlen, "SSL_CTX_new", NULL);
        return NULL;
    }
    if (load_common(ctx, cfg, err, errlen) < 0) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

SSL_CTX *tls_server_ctx(const struct vm_tls_cfg *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = new_ctx(TLS_server_method(), cfg, err, errlen);
    if (!ctx)
        return NULL;
    /* Request a certificate but let the handshake finish whatever it is: the decision
     * (required, verified, allowlist) is made afterwards in tls_check_client, so a refused
     * client gets libvirt's behaviour, a clean close before the 0x01 byte. */
    SSL_CTX_set_verify(ctx, cfg->verify_client ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, accept_any);
    SSL_CTX_set_verify_depth(ctx, 8);
    /* No TLS 1.3 session tickets: libvirt's client reads the 0x01 confirmation right after
     * the handshake, and a ticket record arriving first makes that read fail with EAGAIN.
     * libvirt clients never resume sessions anyway. */
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    return ctx;
}

SSL_CTX *tls_client_ctx(const struct vm_tls_cfg *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = new_ctx(TLS_client_method(), cfg, err, errlen);
    if (!ctx)
        return NULL;
    SSL_CTX_set_verify(ctx, cfg->no_verify ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    return ctx;
}

void tls_ctx_free(SSL_CTX *ctx)
{
    SSL_CTX_free(ctx);
}

void tls_peer_dn(SSL *ssl, char *dn, size_t len)
{
    dn[0] = '\0';
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (!cert)
        return;
    BIO *bio = BIO_new(BIO_s_mem());
    /* RFC 2253 escaping and short names, but certificate order (no XN_FLAG_DN_REV): the
     * string libvirtd builds with GnuTLS, "C=GB,O=Test,CN=client1". */
    unsigned long flags = ASN1_STRFLGS_RFC2253 | XN_FLAG_SEP_COMMA_PLUS | XN_FLAG_FN_SN |
                          XN_FLAG_DUMP_UNKNOWN_FIELDS;
    if (bio && X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, flags) >= 0) {
        int n = BIO_read(bio, dn, (int)len - 1);
        dn[n > 0 ? n : 0] = '\0';
    }
    BIO_free(bio);
    X509_free(cert);
}

int tls_dn_allowed(char *const *patterns, const char *dn)
{
    if (!patterns)
        return 1;
    for (char *const *p = patterns; *p; p++)
        if (fnmatch(*p, dn, 0) == 0)
            return 1;
    return 0;
}

int tls_check_client(SSL *ssl, const struct vm_tls_cfg *cfg, char *dn, size_t dnlen, char *err,
                     size_t errlen)
{
    tls_peer_dn(ssl, dn, dnlen);
    X509 *cert = SSL_get0_peer_certificate(ssl);
    if (!cert) {
        if (cfg->verify_client == VM_TLS_VERIFY_REQUIRED) {
            snprintf(err, errlen, "no client certificate");
            return -1;
        }
        return 0;
    }
    long vr = SSL_get_verify_result(ssl);
    if (vr != X509_V_OK) {
        snprintf(err, errlen, "client certificate %s: %s", dn, X509_verify_cert_error_string(vr));
        return -1;
    }
    if (X509_check_ca(cert)) {
        snprintf(err, errlen, "client certificate %s is a CA certificate", dn);
        return -1;
    }
    if (!tls_dn_allowed(cfg->allowed_dn, dn)) {
        snprintf(err, errlen, "client certificate DN \"%s\" is not in allowed_dn", dn);
        return -1;
    }
    return 0;
}
