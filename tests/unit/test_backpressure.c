/* Back-pressure towards a client that does not read: the gateway must stop reading its calls
 * once about OUT_HIGH bytes of replies wait for it, on a plain session and on one inside the
 * SASL security layer (DIGEST-MD5 over "TCP", where the session's bufferevent is a filter over
 * the socket). The engine runs in this process against tests/fuzz/fake_libvirtd.c; the client
 * is a bufferevent on a socketpair, wrapped in the engine's own SASL client layer.
 * Exit 77 (skipped) when saslpasswd2 is missing. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "auth.h"
#include "check.h"
#include "config.h"
#include "fake_libvirtd.h"
#include "gateway.h"
#include "identity.h"
#include "log.h"
#include "proc.h"
#include "session.h"
#include "wire.h"

#define NCALLS 200
#define REPLY_BYTES 65536

static struct event_base *base;
static char dir[] = "/tmp/vm-backpressure.XXXXXX";

static void pump(int turns)
{
    for (int i = 0; i < turns; i++) {
        event_base_loop(base, EVLOOP_NONBLOCK);
        if (i % 16 == 15)
            usleep(200);
    }
}

/* Wait for one whole packet on `bev`; its payload (malloc'd) in *payload. -1 on timeout. */
static int read_packet(struct bufferevent *bev, struct vm_hdr *h, uint8_t **payload, size_t *n)
{
    for (int i = 0; i < 5000; i++) {
        uint32_t len;
        struct evbuffer *in = bufferevent_get_input(bev);
        if (wire_frame_ready(in, &len) == 1) {
            wire_hdr_peek(in, h);
            *n = len - VM_HDR_LEN;
            *payload = malloc(*n + 1);
            evbuffer_drain(in, VM_HDR_LEN);
            evbuffer_remove(in, *payload, *n);
            return 0;
        }
        pump(1);
        usleep(100);
    }
    return -1;
}

static void send_call(struct bufferevent *bev, int32_t proc, uint32_t serial, const struct xbuf *b)
{
    wire_put_packet(bufferevent_get_output(bev), VM_PROG_REMOTE, proc, VM_CALL, serial,
                    VM_STATUS_OK, b ? b->p : NULL, b ? b->len : 0);
}

/* Log in with DIGEST-MD5 the way upstream.c does; returns the wrapped client bufferevent. */
static struct bufferevent *sasl_login(struct bufferevent *bev, const char *pwfile)
{
    struct vm_hdr h;
    uint8_t *p;
    size_t n;
    char err[300];
    send_call(bev, 67, 1, NULL); /* AUTH_SASL_INIT */
    if (read_packet(bev, &h, &p, &n) < 0 || h.status != VM_STATUS_OK)
        return NULL;
    struct xrd r;
    xr_init(&r, p, n);
    char *mechs = xr_string(&r, 4096);
    free(p);
    struct vm_sasl_client *c = vmsasl_client_begin("alice", pwfile, "localhost", 0, 0, err,
                                                   sizeof(err));
    const char *mech = NULL, *out = NULL;
    unsigned outlen = 0;
    if (!c || !mechs || vmsasl_client_first(c, mechs, &mech, &out, &outlen, err, sizeof(err)) < 0) {
        fprintf(stderr, "SASL client: %s\n", err);
        return NULL;
    }
    free(mechs);
    struct xbuf b;
    xb_init(&b);
    xb_string(&b, mech);
    xb_nil_chars(&b, out, outlen);
    send_call(bev, 68, 2, &b);
    for (uint32_t serial = 3;; serial++) {
        if (read_packet(bev, &h, &p, &n) < 0 || h.status != VM_STATUS_OK) {
            fprintf(stderr, "SASL login refused\n");
            return NULL;
        }
        static char data[65536];
        unsigned len;
        int nil;
        xr_init(&r, p, n);
        int complete = xr_i32(&r);
        int rc = xr_nil_chars(&r, data, sizeof(data), &len, &nil);
        free(p);
        if (rc < 0)
            return NULL;
        if ((!complete || !nil) && !vmsasl_client_done(c) &&
            vmsasl_client_next(c, nil ? NULL : data, len, &out, &outlen, err, sizeof(err)) < 0)
            return NULL;
        if (complete)
            break;
        b.len = 0;
        xb_nil_chars(&b, out, outlen);
        send_call(bev, 69, serial, &b);
    }
    xb_free(&b);
    if (vmsasl_client_layer(c, 0, err, sizeof(err)) <= 0) {
        fprintf(stderr, "no SASL security layer: %s\n", err);
        return NULL;
    }
    /* The client state must outlive the wrapped bufferevent: kept until exit. */
    return vmsasl_client_wrap(c, bev);
}

/* One client on `listener`: log in if asked, open, then send NCALLS calls without reading a
 * byte of the replies. Returns how many calls reached libvirtd. */
static unsigned flood(struct vm_gateway *gw, struct fake_libvirtd *fake,
                      const struct vm_listener_cfg *l, int tcp, const char *pwfile)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    evutil_make_socket_nonblocking(sv[0]);
    evutil_make_socket_nonblocking(sv[1]);
    struct vm_identity id = {.listener = l->name, .is_unix = !tcp};
    if (tcp) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&id.addr;
        sin->sin_family = AF_INET;
        sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        snprintf(id.source, sizeof(id.source), "127.0.0.1");
    }
    gateway_adopt(gw, l, sv[0], tcp ? "127.0.0.1:1" : "local", &id, NULL);
    struct bufferevent *bev = bufferevent_socket_new(base, sv[1], BEV_OPT_CLOSE_ON_FREE);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    if (pwfile) {
        bev = sasl_login(bev, pwfile);
        CHECK(bev != NULL);
        if (!bev)
            return NCALLS;
        bufferevent_enable(bev, EV_READ | EV_WRITE);
    }
    struct xbuf b;
    xb_init(&b);
    xb_opt_string(&b, "");
    xb_u32(&b, 0);
    send_call(bev, VM_PROC_CONNECT_OPEN, 100, &b);
    xb_free(&b);
    struct vm_hdr h;
    uint8_t *p;
    size_t n;
    CHECK(read_packet(bev, &h, &p, &n) == 0 && h.serial == 100 && h.status == VM_STATUS_OK);
    free(p);

    unsigned before = fake_libvirtd_calls(fake);
    bufferevent_disable(bev, EV_READ); /* from now on the client reads nothing */
    for (uint32_t i = 0; i < NCALLS; i++)
        send_call(bev, 4 /* CONNECT_GET_VERSION */, 200 + i, NULL);
    unsigned last = 0, now;
    for (int quiet = 0; quiet < 20;) {
        pump(64);
        now = fake_libvirtd_calls(fake) - before;
        quiet = now == last ? quiet + 1 : 0;
        last = now;
    }
    bufferevent_free(bev);
    pump(64);
    return last;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    vm_log_setup(getenv("TEST_LOG") ? VM_LOG_DEBUG : VM_LOG_ERROR, 0);
    if (!mkdtemp(dir))
        return 1;
    char sock[160], db[160], pw[160], cmd[600], json[2048];
    snprintf(sock, sizeof(sock), "%s/libvirt-sock", dir);
    snprintf(db, sizeof(db), "%s/gw.sasldb", dir);
    snprintf(pw, sizeof(pw), "%s/alice.pw", dir);
    snprintf(cmd, sizeof(cmd), "echo secret | saslpasswd2 -f %s -a libvirt -u localhost -c -p alice "
             ">/dev/null 2>&1 && echo secret > %s", db, pw);
    if (system(cmd) != 0) {
        printf("saslpasswd2 not usable: skipped\n");
        return 77;
    }
    snprintf(json, sizeof(json),
             "{\"listeners\": [{\"name\": \"plain\", \"unix\": \"/nonexistent/plain\"},"
             "   {\"name\": \"tcpsasl\", \"address\": \"127.0.0.1:1\", \"auth\": \"sasl\"}],"
             " \"sasl\": {\"sasldb\": \"%s\", \"mechanisms\": [\"digest-md5\"],"
             "   \"service_host\": \"localhost\"},"
             " \"upstreams\": [{\"name\": \"hv1\", \"uri\": \"test+unix:///default?socket=%s\"}],"
             " \"default_upstream\": \"hv1\"}", db, sock);
    struct vm_config *cfg = config_parse(json, stderr);
    CHECK(cfg != NULL);
    if (!cfg)
        return check_done();
    base = event_base_new();
    struct vm_gateway *gw = gateway_new(base, cfg);
    CHECK(auth_global_init(cfg->sasl) == 0);
    struct fake_libvirtd *fake = fake_libvirtd_new(base, sock);
    CHECK(fake != NULL);
    fake_libvirtd_reply_bytes(fake, REPLY_BYTES);

    /* 200 replies of 64 KiB are 12.5 MiB; a bounded gateway holds about 1 MiB of them plus
     * what the socket buffers take, then stops reading the client. */
    unsigned plain = flood(gw, fake, &cfg->listeners[0], 0, NULL);
    printf("plain session: %u of %d calls forwarded before the gateway stopped reading\n",
           plain, NCALLS);
    CHECK(plain > 0 && plain < NCALLS / 2);
    unsigned layered = flood(gw, fake, &cfg->listeners[1], 1, pw);
    printf("SASL-layer session: %u of %d calls forwarded before the gateway stopped reading\n",
           layered, NCALLS);
    CHECK(layered > 0 && layered < NCALLS / 2);

    fake_libvirtd_drop_all(fake);
    pump(64);
    gateway_free(gw);
    fake_libvirtd_free(fake);
    event_base_free(base);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return check_done();
}
