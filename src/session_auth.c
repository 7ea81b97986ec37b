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
#include "gateway.h"
#include "log.h"
#include "proc.h"
#include "session.h"
#include "session_int.h"
#include "tls.h"

int session_uses_sasl(const struct vm_session *s)
{
    return s->lcfg->auth == VM_AUTH_SASL || s->lcfg->auth == VM_AUTH_TLS_SASL;
}

void session_release_unauth(struct vm_session *s)
{
    if (s->unauth_slot) {
        s->unauth_slot = 0;
        gateway_unauth_release(s->gw);
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
void session_handle_auth(struct vm_session *s, const struct vm_hdr *h, struct evbuffer *pkt)
{
    const struct vm_config *cfg = gateway_config(s->gw);
    if (!session_uses_sasl(s) || h->proc == 70 /* AUTH_POLKIT */ || !cfg->sasl) {
        session_reply_error(s, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                            "authentication failed: unsupported authentication type");
        return;
    }
    if (s->authed) {
        session_reply_error(s, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                            "authentication failed: already authenticated");
        return;
    }
    if (!s->auth)
        s->auth = auth_new(cfg->sasl, s->ssl || !s->is_tcp,
                           s->ssl ? SSL_get_cipher_bits(s->ssl, NULL) : 0, s->ident.source);
    size_t n = h->len - VM_HDR_LEN;
    const uint8_t *args = evbuffer_pullup(pkt, -1) + VM_HDR_LEN;
    int rc = auth_handle(s->auth, h, args, n, session_out(s), s->tag);
    if (rc < 0) {
        audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, "AUTH_SASL", NULL,
                     "authentication failed");
        return;
    }
    if (rc == 0)
        return;
    snprintf(s->sasl_user, sizeof(s->sasl_user), "%s", auth_user(s->auth));
    s->ident.sasl_user = s->sasl_user;
    session_set_authenticated(s, "sasl");
    if (auth_ssf(s->auth) > 0) {
        /* The reply above is still plain; from the next byte on both directions are
         * SASL-encoded. The filter takes over the socket bufferevent. */
        struct bufferevent *under = s->bev;
        struct bufferevent *f = auth_wrap(s->auth, under);
        if (!f) {
            session_close(s, "cannot start the SASL security layer");
            return;
        }
        s->bev = f;
        /* Back-pressure and the event queue limit look at the plaintext waiting in the
         * filter. The filter moves everything it can into the socket's buffer, so cap that:
         * above OUT_LOW encoded bytes it keeps the rest, where the session counts it. What
         * the socket buffer holds now (the reply above) is no event: start counting afresh. */
        evbuffer_remove_cb(bufferevent_get_output(under), session_output_cb, s);
        s->nruns = s->headrun = 0;
        bufferevent_setwatermark(under, EV_WRITE, OUT_LOW / 2, OUT_LOW);
        evbuffer_add_cb(bufferevent_get_output(s->bev), session_output_cb, s);
        bufferevent_setcb(s->bev, session_read_cb, session_write_cb, session_event_cb, s);
        bufferevent_setwatermark(s->bev, EV_WRITE, OUT_LOW, 0);
        bufferevent_enable(s->bev, EV_READ);
        vm_debug(s->tag, "SASL security layer on (ssf %d)", auth_ssf(s->auth));
    }
}

/* The TLS handshake is done: check the client certificate, then libvirt's 0x01 byte. */
void session_tls_established(struct vm_session *s)
{
    char err[600];
    const struct vm_tls_cfg *t = s->lcfg->tls;
    if (tls_check_client(s->ssl, t, s->tls_dn, sizeof(s->tls_dn), err, sizeof(err)) < 0) {
        audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, "TLS", NULL, err);
        session_close(s, err); /* no 0x01: the client reports the refusal */
        return;
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
}

void session_auth_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct vm_session *s = arg;
    audit_denied(gateway_audit(s->gw), s->tag, s->ident_str, "AUTH", NULL,
                 "did not authenticate within auth_timeout_s");
    session_close(s, "authentication timed out");
}
