#include "auth.h"

#include <fnmatch.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <sasl/sasl.h>

#include "config.h"
#include "log.h"
#include "proc.h"
#include "util.h"

#define SASL_DATA_MAX 65536
#define FAIL_SLOTS 1024


struct vm_sasl {
    const struct vm_sasl_cfg *cfg; /* config snapshot */
    sasl_conn_t *conn;             /* owned; NULL before INIT and after a failure */
    int secure;
    int ext_ssf;
    int started;
    int ssf;
    unsigned maxout;
    char user[256];
    char source[64];
    char mech[32];                 /* the mechanism the client chose at START, or "" */
    int limited;                   /* the last attempt was refused: too many failures */
};

/* ---- process-wide state: cyrus-sasl options and the failure table ---- */

static const struct vm_sasl_cfg *g_cfg;
static int g_inited;

struct fail_slot {
    char source[64];
    time_t start;
    int count;
};
static struct fail_slot fails[FAIL_SLOTS];

static int sasl_getopt(void *context, const char *plugin, const char *option, const char **result,
                       unsigned *len)
{
    const char *v = NULL;
    if (!strcmp(option, "sasldb_path"))
        v = g_cfg->sasldb;
    else if (!strcmp(option, "mech_list"))
        v = g_cfg->mechanisms;
    else if (!strcmp(option, "pwcheck_method"))
        v = "auxprop";
    else if (!strcmp(option, "auxprop_plugin"))
        v = "sasldb";
    else if (!strcmp(option, "keytab"))
        v = g_cfg->keytab;
    if (!v)
        return SASL_FAIL;
    *result = v;
    if (len)
        *len = (unsigned)strlen(v);
    return SASL_OK;
}

/* Keep cyrus-sasl away from /etc/sasl2/libvirt.conf: everything comes from our config. */
static int sasl_confpath(void *context, const char **path)
{
    *path = "/nonexistent/virtmux-sasl";
    return SASL_OK;
}

/* cyrus-sasl stores every callback as int (*)(void); going through void (*)(void) is the
 * documented way to say the cast is intended. */
#define SASL_FN(f) ((int (*)(void))(void (*)(void))(f))

static const sasl_callback_t callbacks[] = {
    {SASL_CB_GETOPT, SASL_FN(sasl_getopt), NULL},
    {SASL_CB_GETCONFPATH, SASL_FN(sasl_confpath), NULL},
    {SASL_CB_LIST_END, NULL, NULL},
};

int auth_global_init(const struct vm_sasl_cfg *cfg)
{
    g_cfg = cfg;
    if (g_inited)
        return 0;
    if (cfg->keytab)
        setenv("KRB5_KTNAME", cfg->keytab, 1);
    int rc = sasl_server_init(callbacks, "libvirt");
    if (rc != SASL_OK) {
        vm_err("sasl", "cannot initialise cyrus-sasl: %s", sasl_errstring(rc, NULL, NULL));
        return -1;
    }
    g_inited = 1;
    vm_info("sasl", "mechanisms \"%s\", sasldb %s", cfg->mechanisms,
            cfg->sasldb ? cfg->sasldb : "(none)");
    return 0;
}

void auth_global_done(void)
{
    if (g_inited)
        sasl_server_done();
    g_inited = 0;
}

static struct fail_slot *fail_slot(const char *source, int create)
{
    struct fail_slot *oldest = &fails[0];
    for (int i = 0; i < FAIL_SLOTS; i++) {
        if (fails[i].source[0] && !strcmp(fails[i].source, source))
            return &fails[i];
        if (fails[i].start < oldest->start)
            oldest = &fails[i];
    }
    if (!create)
        return NULL;
    memset(oldest, 0, sizeof(*oldest));
    snprintf(oldest->source, sizeof(oldest->source), "%s", source);
    oldest->start = time(NULL);
    return oldest;
}

static int blocked(const struct vm_sasl *a)
{
    struct fail_slot *f = fail_slot(a->source, 0);
    if (!f || time(NULL) - f->start >= a->cfg->failure_window_s)
        return 0;
    return f->count >= a->cfg->max_failures;
}

static void record_failure(struct vm_sasl *a, const char *tag, const char *why)
{
    struct fail_slot *f = fail_slot(a->source, 1);
    if (time(NULL) - f->start >= a->cfg->failure_window_s) {
        f->start = time(NULL);
        f->count = 0;
    }
    f->count++;
    vm_warn(tag, "SASL authentication failed from %s (%d in %d s): %s", a->source, f->count,
            a->cfg->failure_window_s, why);
}

/* ---- sessions ---- */

struct vm_sasl *auth_new(const struct vm_sasl_cfg *cfg, int secure, int ext_ssf,
                         const char *source)
{
    struct vm_sasl *a = vm_calloc(1, sizeof(*a));
    a->cfg = cfg;
    a->secure = secure;
    a->ext_ssf = ext_ssf;
    snprintf(a->source, sizeof(a->source), "%s", source && source[0] ? source : "unix");
    return a;
}

void auth_free(struct vm_sasl *a)
{
    if (!a)
        return;
    if (a->conn)
        sasl_dispose(&a->conn);
    free(a);
}

const char *auth_user(const struct vm_sasl *a)
{
    return a->user;
}

int auth_ssf(const struct vm_sasl *a)
{
    return a->ssf;
}

static void fail(struct vm_sasl *a, const struct vm_hdr *h, struct evbuffer *out, const char *tag,
                 const char *why)
{
    record_failure(a, tag, why);
    if (a->conn)
        sasl_dispose(&a->conn);
    a->started = 0;
    wire_put_error(out, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                   "authentication failed: authentication failed");
}

static int do_init(struct vm_sasl *a, const struct vm_hdr *h, struct evbuffer *out, const char *tag)
{
    if (a->conn) {
        wire_put_error(out, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                       "authentication failed: SASL authentication already started");
        return -1;
    }
    /* The server name makes the GSSAPI acceptor libvirt/HOST: the name clients put in their
     * URI, which is not always this machine's hostname. */
    int rc = sasl_server_new("libvirt", a->cfg->service_host, NULL, NULL, NULL, NULL,
                             SASL_SUCCESS_DATA, &a->conn);
    if (rc != SASL_OK) {
        fail(a, h, out, tag, sasl_errstring(rc, NULL, NULL));
        return -1;
    }
    sasl_security_properties_t sp;
    memset(&sp, 0, sizeof(sp));
    sp.maxbufsize = SASL_DATA_MAX;
    if (a->secure) {
        sp.min_ssf = 0; /* TLS or unix: no security layer, ever */
        sp.max_ssf = 0;
    } else {
        sp.min_ssf = 56; /* plain TCP: only mechanisms with a layer */
        sp.max_ssf = 100000;
        sp.security_flags = SASL_SEC_NOANONYMOUS | SASL_SEC_NOPLAINTEXT;
    }
    sasl_setprop(a->conn, SASL_SEC_PROPS, &sp);
    if (a->ext_ssf) {
        sasl_ssf_t ext = (sasl_ssf_t)a->ext_ssf;
        sasl_setprop(a->conn, SASL_SSF_EXTERNAL, &ext);
    }
    const char *list;
    unsigned len;
    int count;
    rc = sasl_listmech(a->conn, NULL, "", ",", "", &list, &len, &count);
    if (rc != SASL_OK || count == 0) {
        fail(a, h, out, tag, "no SASL mechanism available for this transport");
        return -1;
    }
    struct xbuf b;
    xb_init(&b);
    xb_string(&b, list);
    wire_put_reply(out, h, b.p, b.len);
    xb_free(&b);
    vm_debug(tag, "SASL mechanisms offered: %s", list);
    return 0;
}


static int finish_step(struct vm_sasl *a, int rc, const char *data, unsigned dlen,
                       const struct vm_hdr *h, struct evbuffer *out, const char *tag)
{
    if (rc != SASL_OK && rc != SASL_CONTINUE) {
        fail(a, h, out, tag, sasl_errdetail(a->conn));
        return -1;
    }
    if (dlen > SASL_DATA_MAX) {
        fail(a, h, out, tag, "SASL token too large");
        return -1;
    }
    int complete = rc == SASL_OK;
    if (complete) {
        const void *v = NULL;
        sasl_getprop(a->conn, SASL_SSF, &v);
        int ssf = v ? (int)*(const sasl_ssf_t *)v : 0;
        if (!a->secure && ssf < 56) {
            fail(a, h, out, tag, "negotiated SSF too weak for plain TCP");
            return -1;
        }
        v = NULL;
        sasl_getprop(a->conn, SASL_USERNAME, &v);
        const char *user = v ? v : "";
        int ok = !a->cfg->allowed_users;
        for (char **p = a->cfg->allowed_users; p && *p && !ok; p++)
            ok = fnmatch(*p, user, 0) == 0;
        if (!ok) {
            char why[300];
            snprintf(why, sizeof(why), "user \"%s\" is not in sasl.allowed_users", user);
            fail(a, h, out, tag, why);
            return -1;
        }
        snprintf(a->user, sizeof(a->user), "%s", user);
        a->ssf = a->secure ? 0 : ssf;
        v = NULL;
        sasl_getprop(a->conn, SASL_MAXOUTBUF, &v);
        a->maxout = v ? *(const unsigned *)v : 4096;
        if (a->maxout == 0 || a->maxout > SASL_DATA_MAX)
            a->maxout = SASL_DATA_MAX;
    }
    struct xbuf b;
    xb_init(&b);
    xb_i32(&b, complete);
    xb_nil_chars(&b, data, dlen);
    wire_put_reply(out, h, b.p, b.len);
    xb_free(&b);
    return complete;
}

int auth_handle(struct vm_sasl *a, const struct vm_hdr *h, const uint8_t *args, size_t n,
                struct evbuffer *out, const char *tag)
{
    if (h->proc == VM_PROC_AUTH_SASL_INIT)
        return do_init(a, h, out, tag) < 0 ? -1 : 0;
    if (!a->conn) {
        wire_put_error(out, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                       "authentication failed: SASL authentication not initialised");
        return -1;
    }
    a->limited = 0;
    if (blocked(a)) {
        a->limited = 1;
        vm_warn(tag, "SASL attempt from %s refused: too many failures", a->source);
        if (a->conn)
            sasl_dispose(&a->conn);
        wire_put_error(out, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                       "authentication failed: too many failed attempts, try again later");
        return -1;
    }
    static unsigned char data[SASL_DATA_MAX];
    unsigned dlen = 0;
    int nil = 0;
    struct xrd r;
    xr_init(&r, args, n);
    const char *outdata = NULL;
    unsigned outlen = 0;
    int rc;
    if (h->proc == VM_PROC_AUTH_SASL_START) {
        char *mech = xr_string(&r, 100);
        if (!mech || xr_nil_chars(&r, data, sizeof(data), &dlen, &nil) < 0 || a->started) {
            free(mech);
            fail(a, h, out, tag, "malformed or repeated AUTH_SASL_START");
            return -1;
        }
        a->started = 1;
        snprintf(a->mech, sizeof(a->mech), "%s", mech);
        vm_debug(tag, "SASL start, mechanism %s", mech);
        rc = sasl_server_start(a->conn, mech, nil ? NULL : (const char *)data, dlen, &outdata,
                               &outlen);
        free(mech);
    } else if (h->proc == VM_PROC_AUTH_SASL_STEP) {
        if (xr_nil_chars(&r, data, sizeof(data), &dlen, &nil) < 0 || !a->started) {
            fail(a, h, out, tag, "malformed AUTH_SASL_STEP");
            return -1;
        }
        rc = sasl_server_step(a->conn, nil ? NULL : (const char *)data, dlen, &outdata, &outlen);
    } else {
        wire_put_error(out, h, VIR_ERR_AUTH_FAILED, VIR_FROM_RPC,
                       "authentication failed: unsupported authentication type");
        return -1;
    }
    return finish_step(a, rc, outdata, outlen, h, out, tag);
}

const char *auth_mechanism(const struct vm_sasl *a)
{
    return a->mech[0] ? a->mech : NULL;
}

int auth_was_limited(const struct vm_sasl *a)
{
    return a->limited;
}

/* ---- the security layer (both directions, server or client connection) ---- */

struct layer {
    sasl_conn_t *conn; /* not owned */
    unsigned maxout;
};

/* Run `code` (sasl_encode or sasl_decode) over everything in src, in chunks of `chunk`. */
static enum bufferevent_filter_result transcode(struct evbuffer *src, struct evbuffer *dst,
                                                sasl_conn_t *conn, unsigned chunk,
                                                int (*code)(sasl_conn_t *, const char *, unsigned,
                                                            const char **, unsigned *))
{
    size_t n;
    while ((n = evbuffer_get_length(src)) > 0) {
        if (n > chunk)
            n = chunk;
        const char *in = (const char *)evbuffer_pullup(src, (ev_ssize_t)n);
        const char *res;
        unsigned rlen;
        if (code(conn, in, (unsigned)n, &res, &rlen) != SASL_OK)
            return BEV_ERROR;
        if (rlen)
            evbuffer_add(dst, res, rlen);
        evbuffer_drain(src, n);
    }
    return BEV_OK;
}

/* Incoming bytes: sasl_decode reassembles blocks split across reads. */
static enum bufferevent_filter_result decode_in(struct evbuffer *src, struct evbuffer *dst,
                                                ev_ssize_t lim, enum bufferevent_flush_mode m,
                                                void *arg)
{
    struct layer *ly = arg;
    return transcode(src, dst, ly->conn, SASL_DATA_MAX, sasl_decode);
}

/* Outgoing bytes: at most maxout plaintext bytes per sasl_encode. */
static enum bufferevent_filter_result encode_out(struct evbuffer *src, struct evbuffer *dst,
                                                 ev_ssize_t lim, enum bufferevent_flush_mode m,
                                                 void *arg)
{
    struct layer *ly = arg;
    return transcode(src, dst, ly->conn, ly->maxout, sasl_encode);
}

static struct bufferevent *wrap(sasl_conn_t *conn, unsigned maxout, struct bufferevent *under)
{
    struct layer *ly = vm_calloc(1, sizeof(*ly));
    ly->conn = conn;
    ly->maxout = maxout;
    struct bufferevent *f = bufferevent_filter_new(under, decode_in, encode_out,
                                                   BEV_OPT_CLOSE_ON_FREE, free, ly);
    if (!f)
        free(ly);
    return f;
}

struct bufferevent *auth_wrap(struct vm_sasl *a, struct bufferevent *under)
{
    return wrap(a->conn, a->maxout, under);
}

/* ---- the gateway as a SASL client of libvirtd ---- */

struct vm_sasl_client {
    sasl_conn_t *conn;      /* owned */
    sasl_callback_t *cbs;   /* owned: must outlive conn */
    char user[256];
    sasl_secret_t *secret;  /* owned; wiped on free */
    int done;               /* our side completed */
    unsigned maxout;
    int ssf;
};

static int g_client_inited;

static int cb_user(void *ctx, int id, const char **result, unsigned *len)
{
    struct vm_sasl_client *c = ctx;
    *result = c->user;
    if (len)
        *len = (unsigned)strlen(c->user);
    return SASL_OK;
}

static int cb_pass(sasl_conn_t *conn, void *ctx, int id, sasl_secret_t **psecret)
{
    struct vm_sasl_client *c = ctx;
    *psecret = c->secret;
    return SASL_OK;
}

static int cb_realm(void *ctx, int id, const char **avail, const char **result)
{
    *result = avail && avail[0] ? avail[0] : "";
    return SASL_OK;
}

struct vm_sasl_client *vmsasl_client_begin(const char *user, const char *password_file,
                                         const char *host, int secure, int ext_ssf, char *err,
                                         size_t errlen)
{
    if (!g_client_inited) {
        int rc = sasl_client_init(NULL);
        if (rc != SASL_OK) {
            snprintf(err, errlen, "sasl_client_init: %s", sasl_errstring(rc, NULL, NULL));
            return NULL;
        }
        g_client_inited = 1;
    }
    FILE *f = fopen(password_file, "r");
    if (!f) {
        snprintf(err, errlen, "cannot read the password file %s: %s", password_file,
                 strerror(errno));
        return NULL;
    }
    char pw[1024];
    size_t n = fread(pw, 1, sizeof(pw) - 1, f);
    fclose(f);
    while (n && (pw[n - 1] == '\n' || pw[n - 1] == '\r'))
        n--;
    struct vm_sasl_client *c = vm_calloc(1, sizeof(*c));
    snprintf(c->user, sizeof(c->user), "%s", user);
    c->secret = malloc(sizeof(sasl_secret_t) + n + 1);
    if (!c->secret)
        abort();
    c->secret->len = n;
    memcpy(c->secret->data, pw, n);
    c->secret->data[n] = '\0';
    memset(pw, 0, sizeof(pw));

    /* The callbacks live as long as the connection: keep them in static storage per
     * client by allocating them with it. */
    sasl_callback_t *cbs = vm_calloc(5, sizeof(*cbs));
    cbs[0] = (sasl_callback_t){SASL_CB_USER, SASL_FN(cb_user), c};
    cbs[1] = (sasl_callback_t){SASL_CB_AUTHNAME, SASL_FN(cb_user), c};
    cbs[2] = (sasl_callback_t){SASL_CB_PASS, SASL_FN(cb_pass), c};
    cbs[3] = (sasl_callback_t){SASL_CB_GETREALM, SASL_FN(cb_realm), c};
    cbs[4] = (sasl_callback_t){SASL_CB_LIST_END, NULL, NULL};
    int rc = sasl_client_new("libvirt", host, NULL, NULL, cbs, 0, &c->conn);
    if (rc != SASL_OK) {
        snprintf(err, errlen, "sasl_client_new: %s", sasl_errstring(rc, NULL, NULL));
        vmsasl_client_end(c);
        free(cbs);
        return NULL;
    }
    /* cbs must outlive the connection; keep it in the secret's shadow: freed in end. */
    c->cbs = cbs;
    sasl_security_properties_t sp;
    memset(&sp, 0, sizeof(sp));
    sp.maxbufsize = SASL_DATA_MAX;
    if (!secure) {
        sp.min_ssf = 56;
        sp.max_ssf = 100000;
        sp.security_flags = SASL_SEC_NOANONYMOUS | SASL_SEC_NOPLAINTEXT;
    }
    sasl_setprop(c->conn, SASL_SEC_PROPS, &sp);
    if (ext_ssf) {
        sasl_ssf_t ext = (sasl_ssf_t)ext_ssf;
        sasl_setprop(c->conn, SASL_SSF_EXTERNAL, &ext);
    }
    return c;
}

void vmsasl_client_end(struct vm_sasl_client *c)
{
    if (!c)
        return;
    if (c->conn)
        sasl_dispose(&c->conn);
    if (c->secret) {
        memset(c->secret->data, 0, c->secret->len);
        free(c->secret);
    }
    free(c->cbs);
    free(c);
}

static int client_finish(struct vm_sasl_client *c, int rc, char *err, size_t errlen)
{
    if (rc == SASL_OK)
        c->done = 1;
    else if (rc != SASL_CONTINUE) {
        snprintf(err, errlen, "%s", sasl_errdetail(c->conn));
        return -1;
    }
    return 0;
}

int vmsasl_client_first(struct vm_sasl_client *c, const char *mechlist, const char **mech,
                      const char **out, unsigned *outlen, char *err, size_t errlen)
{
    sasl_interact_t *interact = NULL;
    int rc = sasl_client_start(c->conn, mechlist, &interact, out, outlen, mech);
    if (rc == SASL_INTERACT) {
        snprintf(err, errlen, "the SASL mechanism wants interaction");
        return -1;
    }
    return client_finish(c, rc, err, errlen);
}

int vmsasl_client_next(struct vm_sasl_client *c, const char *in, unsigned inlen, const char **out,
                     unsigned *outlen, char *err, size_t errlen)
{
    sasl_interact_t *interact = NULL;
    int rc = sasl_client_step(c->conn, in, inlen, &interact, out, outlen);
    return client_finish(c, rc, err, errlen);
}

int vmsasl_client_done(const struct vm_sasl_client *c)
{
    return c->done;
}

int vmsasl_client_layer(struct vm_sasl_client *c, int secure, char *err, size_t errlen)
{
    const void *v = NULL;
    sasl_getprop(c->conn, SASL_SSF, &v);
    c->ssf = v ? (int)*(const sasl_ssf_t *)v : 0;
    if (!secure && c->ssf < 56) {
        snprintf(err, errlen, "negotiated SSF %d is too weak for plain TCP", c->ssf);
        return -1;
    }
    v = NULL;
    sasl_getprop(c->conn, SASL_MAXOUTBUF, &v);
    c->maxout = v ? *(const unsigned *)v : 4096;
    if (c->maxout == 0 || c->maxout > SASL_DATA_MAX)
        c->maxout = SASL_DATA_MAX;
    return secure ? 0 : c->ssf;
}

struct bufferevent *vmsasl_client_wrap(struct vm_sasl_client *c, struct bufferevent *under)
{
    return wrap(c->conn, c->maxout, under);
}
