/* Routing at CONNECT_OPEN: which upstream serves the name a client opened, and the name to
 * open there.
 *
 *   "qemu:///hv2/system"  -> upstream hv2, "qemu:///system"   (first path segment names it)
 *   "qemu:///system"      -> the listener's upstream, else default_upstream
 *   ""                    -> that upstream's own URI name ("qemu:///system")
 *   "qemu:///hv-7/system" -> no upstream hv-7 but template "hv-*": tpl set, upname "hv-7" (the
 *                            gateway makes the upstream; a name that is no host name is refused)
 *   routing.strict: "qemu:///system" and "qemu:///hv9/system" are errors naming the upstreams
 *   (a listener with its own upstream is not strict: its clients use ordinary names)
 */
#ifndef VM_ROUTER_H
#define VM_ROUTER_H

#include <stddef.h>

#include "fwd.h"

struct vm_route {
    const struct vm_upstream_cfg *upstream; /* NULL while tpl is set, until the owner made it */
    char *name; /* what to send upstream in CONNECT_OPEN; owned by the route */
    const struct vm_upstream_cfg *tpl; /* the template to make upstream `upname` from, or NULL */
    char *upname; /* owned; a checked host name (router_check_name) */
};

/* Resolve `name` (as sent by the client) for a client of a listener whose fallback upstream is
 * `listener_upstream` (may be NULL). Returns 0 and fills `r`, or -1 with the client-facing
 * message in err (no libvirt prefix). */
int router_resolve(const struct vm_config *cfg, const char *listener_upstream, const char *name,
                   struct vm_route *r, char *err, size_t errlen) VM_WUR;
void route_clear(struct vm_route *r);
/* 0 when `name` is a host name ([A-Za-z0-9-] labels of 1..63 joined by single dots, not
 * starting with '-' or '.', 253 at most), else -1 with the rule it breaks in err. */
int router_check_name(const char *name, char *err, size_t errlen) VM_WUR;

#endif
