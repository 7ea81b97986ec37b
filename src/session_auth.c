/*
 * Client authentication inside a session: the TLS confirmation, the SASL exchange (auth.c
 * does the cyrus-sasl work), and the bounds on clients that have not authenticated yet.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "audit.h"
#include "auth.h"
#include "config.h"
#include "env.h"
#include "reap.h"
#include "log.h"
#include "proc.h"
#include "session_int.h"
#include "tls.h"

int session_uses_sasl(const struct vm_session *s)
{
    return s->lcfg->auth == VM_AUTH_SASL || s->lcfg->auth == VM_AUTH_TLS_SASL;
}

const char *session_hold_unauth(struct vm_session *s)
{
    const struct vm_config *cfg = s->env->cfg;
    switch (s->host->ops->unauth_acquire(s->host->owner, s->source)) {
    case VM_UNAUTH_OK:
        break;
    case VM_UNAUTH_FULL:
        vm_warn(s->tag, "refused: max_unauthenticated (%d) clients are authenticating",
                cfg->max_unauthenticated);
        return "too many unauthenticated clients";
    case VM_UNAUTH_SOURCE_FULL:
        vm_warn(s->tag, "refused: %s already has max_unauthenticated_per_source (%d) clients "
                "authenticating", s->source, cfg->max_unauthenticated_per_source);
        return "too many unauthenticated clients from this source";
    }
    s->unauth_slot = 1;
    return NULL;
}

void session_release_unauth(struct vm_session *s)
{
    if (s->unauth_slot) {
        s->unauth_slot = 0;
        s->host->ops->unauth_release(s->host->owner, s->source);
    }
    if (s->auth_timer) {
        event_free(s->auth_timer);
        s->auth_timer = NULL;
    }
}

void session_set_authenticated(struct vm_session *s, const char *how)
{
    s->authed = 1;
    session_release_unauth(s);
    identity_str(&s->ident, s->ident_str, sizeof(s->ident_str));
    vm_info(s->tag, "authenticated (%s) as %s", how, s->ident_str);
}

/* AUTH_SASL_INIT/START/STEP and AUTH_POLKIT. */
static struct bufferevent *wrap_layer(void *arg, struct bufferevent *under)
{
    return auth_wrap(arg, under);
}

int session_handle_auth(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt)
{
    const struct vm_config *cfg = s->env->cfg;
    if (!session_uses_sasl(s) || h->proc == VM_PROC_AUTH_POLKIT || !cfg->sasl) {
        session_reply_error(s, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                            "authentication failed: unsupported authentication type");
        return 0;
    }
    if (s->authed) {
        session_reply_error(s, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                            "authentication failed: already authenticated");
        return 0;
    }
    if (!s->auth)
        s->auth = auth_new(cfg->sasl, s->ssl || !s->is_tcp,
                           s->ssl ? SSL_get_cipher_bits(s->ssl, NULL) : 0, s->source);
    size_t n = h->len - VM_HDR_LEN;
    const uint8_t *args = evbuffer_pullup(pkt, -1) + VM_HDR_LEN;
    int rc = auth_handle(s->auth, h, args, n, session_out(s), s->tag);
    if (rc < 0) {
        if (auth_was_limited(s->auth))
            metrics_limit(s->env->metrics, VM_LIMIT_SASL_MAX_FAILURES);
        metrics_auth_failure(s->env->metrics, s->mlis, metrics_sasl_mech(auth_mechanism(s->auth)));
        metrics_error(s->env->metrics, VM_ERRK_AUTH);
        audit_denied(s->env->audit, s->tag, s->ident_str, "AUTH_SASL", NULL,
                     "authentication failed");
        return 0;
    }
    if (rc == 0)
        return 0;
    snprintf(s->sasl_user, sizeof(s->sasl_user), "%s", auth_user(s->auth));
    s->ident.sasl_user = s->sasl_user;
    session_set_authenticated(s, "sasl");
    if (auth_ssf(s->auth) > 0) {
        /* The reply above is still plain; from the next byte on both directions are
         * SASL-encoded. The filter takes over the socket bufferevent. */
        if (conn_push_filter(s->conn, wrap_layer, s->auth) < 0)
            return -1;
        /* The output watched is the filter's from now on; what the socket's buffer holds
         * (the reply above) is no event: count afresh. */
        s->nruns = s->headrun = 0;
        s->event_bytes = 0;
        vm_debug(s->tag, "SASL security layer on (ssf %d)", auth_ssf(s->auth));
    }
    return 0;
}

/* The TLS handshake is done: check the client certificate, then libvirt's 0x01 byte. */
int session_tls_established(struct vm_session *s, char *err, size_t errlen)
{
    const struct vm_tls_cfg *t = s->lcfg->tls;
    if (tls_check_client(s->ssl, t, s->tls_dn, sizeof(s->tls_dn), err, errlen) < 0) {
        metrics_auth_failure(s->env->metrics, s->mlis, VM_AUTHM_TLS);
        audit_denied(s->env->audit, s->tag, s->ident_str, "TLS", NULL, err);
        return -1;
    }
    if (s->tls_dn[0])
        s->ident.tls_dn = s->tls_dn;
    static const uint8_t ok = 1;
    evbuffer_add(session_out(s), &ok, 1);
    s->state = S_NEW;
    if (s->lcfg->auth == VM_AUTH_TLS)
        session_set_authenticated(s, "tls certificate");
    else if (s->lcfg->auth == VM_AUTH_NONE)
        session_set_authenticated(s, "none");
    identity_str(&s->ident, s->ident_str, sizeof(s->ident_str));
    vm_debug(s->tag, "TLS up (%s), client DN \"%s\"", SSL_get_version(s->ssl), s->tls_dn);
    return 0;
}
