/* Upstream URIs: DRIVER+tcp://host[:port]/PATH and DRIVER+unix:///PATH?socket=SOCK
 * (a bare DRIVER:///PATH means the default unix socket). */
#ifndef VM_URI_H
#define VM_URI_H

#include <stddef.h>

#include "fwd.h"

enum vm_transport { VM_TR_TCP, VM_TR_UNIX, VM_TR_TLS };

struct vm_uri {
    char *driver;     /* "qemu", "test", ... */
    enum vm_transport transport;
    char *host;       /* tcp/tls only */
    int port;         /* tcp/tls only; 16509 (tcp) or 16514 (tls) by default */
    char *socket;     /* unix only */
    char *path;       /* "/system", "/default"; "" when absent */
    char *query;      /* what remains of the query for the driver, without '?'; may be NULL */
};

/* Parse `s` into `u`. On failure returns -1 and writes a reason (no path prefix) into err. */
int uri_parse(const char *s, struct vm_uri *u, char *err, size_t errlen) VM_WUR;
void uri_clear(struct vm_uri *u);
/* An upstream template's URI text with every "{name}" replaced by `name`; caller frees. */
char *uri_expand(const char *text, const char *name);

/* The name libvirtd would see for this URI, e.g. "qemu:///system". Caller frees. */
char *uri_default_name(const struct vm_uri *u);

/* Human form of the address, e.g. "127.0.0.1:16509" or "/run/libvirt/libvirt-sock". */
const char *uri_endpoint(const struct vm_uri *u, char *buf, size_t len);

#endif
