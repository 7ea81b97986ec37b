#include "uri.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define DEFAULT_TCP_PORT 16509
#define DEFAULT_TLS_PORT 16514
#define DEFAULT_UNIX_SOCKET "/var/run/libvirt/libvirt-sock"

void uri_clear(struct vm_uri *u)
{
    free(u->driver);
    free(u->host);
    free(u->socket);
    free(u->path);
    free(u->query);
    memset(u, 0, sizeof(*u));
}

char *uri_expand(const char *text, const char *name)
{
    static const char key[] = "{name}";
    size_t n = 1, klen = sizeof(key) - 1, nlen = strlen(name);
    for (const char *q = text; *q;)
        if (strncmp(q, key, klen) == 0) {
            n += nlen;
            q += klen;
        } else {
            n++;
            q++;
        }
    char *out = vm_calloc(1, n), *o = out;
    for (const char *q = text; *q;)
        if (strncmp(q, key, klen) == 0) {
            memcpy(o, name, nlen);
            o += nlen;
            q += klen;
        } else {
            *o++ = *q++;
        }
    return out;
}

/* Split the query: take socket=..., keep the rest for the driver. */
static int take_query(struct vm_uri *u, const char *q, char *err, size_t errlen)
{
    char *copy = vm_strndup(q, strlen(q));
    char rest[1024] = "";
    char *save = NULL;
    for (char *kv = strtok_r(copy, "&", &save); kv; kv = strtok_r(NULL, "&", &save)) {
        if (strncasecmp(kv, "socket=", 7) == 0) {
            free(u->socket);
            u->socket = vm_strndup(kv + 7, strlen(kv + 7));
        } else if (strncasecmp(kv, "name=", 5) == 0) {
            snprintf(err, errlen, "the \"name\" parameter is not supported");
            free(copy);
            return -1;
        } else {
            if (rest[0])
                strncat(rest, "&", sizeof(rest) - strlen(rest) - 1);
            strncat(rest, kv, sizeof(rest) - strlen(rest) - 1);
        }
    }
    free(copy);
    if (rest[0])
        u->query = vm_strndup(rest, strlen(rest));
    return 0;
}

/* The hypervisor and state drivers libvirt knows by URI scheme (libvirt's drivers/ and the
 * secondary drivers' own URIs), so that "qemu://host" and "http://host" get different
 * advice. */
static int libvirt_driver(const char *d)
{
    static const char *const known[] = {
        "qemu", "test", "lxc", "xen", "libxl", "vbox", "vmwareplayer", "vmwarews",
        "vmwarefusion", "esx", "gsx", "vpx", "hyperv", "bhyve", "openvz", "vz", "parallels",
        "ch", "remote", "network", "nwfilter", "nodedev", "secret", "storage", "interface",
        NULL};
    for (const char *const *k = known; *k; k++)
        if (strcasecmp(d, *k) == 0)
            return 1;
    return 0;
}

int uri_parse(const char *s, struct vm_uri *u, char *err, size_t errlen)
{
    memset(u, 0, sizeof(*u));
    const char *sep = strstr(s, "://");
    if (!sep || sep == s) {
        snprintf(err, errlen, "not a libvirt URI: \"%s\"", s);
        return -1;
    }
    const char *plus = memchr(s, '+', (size_t)(sep - s));
    const char *tr = plus ? plus + 1 : NULL;
    size_t trlen = plus ? (size_t)(sep - tr) : 0;
    u->driver = vm_strndup(s, plus ? (size_t)(plus - s) : (size_t)(sep - s));
    if (!u->driver[0]) {
        snprintf(err, errlen, "missing driver in \"%s\"", s);
        goto fail;
    }

    const char *auth = sep + 3;
    const char *slash = strpbrk(auth, "/?");
    size_t authlen = slash ? (size_t)(slash - auth) : strlen(auth);

    if (!tr || (trlen == 4 && strncmp(tr, "unix", 4) == 0)) {
        u->transport = VM_TR_UNIX;
        if (authlen && tr) {
            snprintf(err, errlen, "a unix URI takes no host (\"%.*s\")", (int)authlen, auth);
            goto fail;
        }
        if (authlen) {
            /* "qemu://host/system": libvirt would pick TLS by itself; here the transport is
             * said. "http://h/x": not a libvirt URI at all. */
            if (libvirt_driver(u->driver))
                snprintf(err, errlen, "a remote host needs a transport: %s+tcp://%.*s%s or "
                         "%s+tls://... (a URI without one is local, over unix)", u->driver,
                         (int)authlen, auth, auth + authlen, u->driver);
            else
                snprintf(err, errlen, "unsupported transport: \"%s\" is no libvirt driver; "
                         "upstream URIs are DRIVER+tcp://HOST/PATH, DRIVER+tls://HOST/PATH or "
                         "DRIVER+unix:///PATH", u->driver);
            goto fail;
        }
    } else if ((trlen == 3 && strncmp(tr, "tcp", 3) == 0) ||
               (trlen == 3 && strncmp(tr, "tls", 3) == 0)) {
        u->transport = strncmp(tr, "tls", 3) == 0 ? VM_TR_TLS : VM_TR_TCP;
        if (!authlen) {
            snprintf(err, errlen, "a tcp URI needs a host");
            goto fail;
        }
        const char *at = memchr(auth, '@', authlen);
        if (at) { /* a user name has no meaning with auth none; ignore it */
            authlen -= (size_t)(at + 1 - auth);
            auth = at + 1;
        }
        const char *colon = NULL;
        if (auth[0] == '[') {
            const char *close = memchr(auth, ']', authlen);
            if (!close) {
                snprintf(err, errlen, "unterminated IPv6 address");
                goto fail;
            }
            u->host = vm_strndup(auth + 1, (size_t)(close - auth - 1));
            if ((size_t)(close + 1 - auth) < authlen && close[1] == ':')
                colon = close + 1;
        } else {
            colon = memchr(auth, ':', authlen);
            u->host = vm_strndup(auth, colon ? (size_t)(colon - auth) : authlen);
        }
        u->port = u->transport == VM_TR_TLS ? DEFAULT_TLS_PORT : DEFAULT_TCP_PORT;
        if (colon) {
            char *end;
            long p = strtol(colon + 1, &end, 10);
            if (end != auth + authlen || p <= 0 || p > 65535) {
                snprintf(err, errlen, "bad port in \"%s\"", s);
                goto fail;
            }
            u->port = (int)p;
        }
    } else {
        snprintf(err, errlen, "unsupported transport \"%.*s\" (virtmux connects with tcp, tls "
                 "or unix)", (int)trlen, tr);
        goto fail;
    }

    const char *p = auth + authlen;
    const char *q = strchr(p, '?');
    u->path = vm_strndup(p, q ? (size_t)(q - p) : strlen(p));
    if (q && take_query(u, q + 1, err, errlen) < 0)
        goto fail;
    if (u->transport == VM_TR_UNIX && !u->socket)
        u->socket = vm_strndup(DEFAULT_UNIX_SOCKET, strlen(DEFAULT_UNIX_SOCKET));
    if (u->transport != VM_TR_UNIX && u->socket) {
        snprintf(err, errlen, "\"socket\" only applies to unix URIs");
        goto fail;
    }
    return 0;
fail:
    uri_clear(u);
    return -1;
}

char *uri_default_name(const struct vm_uri *u)
{
    size_t n = strlen(u->driver) + strlen(u->path) + (u->query ? strlen(u->query) + 1 : 0) + 8;
    char *s = malloc(n);
    if (!s)
        abort();
    snprintf(s, n, "%s://%s%s%s", u->driver, u->path, u->query ? "?" : "",
             u->query ? u->query : "");
    return s;
}

const char *uri_endpoint(const struct vm_uri *u, char *buf, size_t len)
{
    if (u->transport != VM_TR_UNIX)
        snprintf(buf, len, strchr(u->host, ':') ? "[%s]:%d" : "%s:%d", u->host, u->port);
    else
        snprintf(buf, len, "%s", u->socket);
    return buf;
}
