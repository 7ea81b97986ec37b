/* Routing at CONNECT_OPEN: which upstream serves the name a client opened, and the name to
 * open there.
 *
 *   "qemu:///hv2/system"  -> upstream hv2, "qemu:///system"   (first path segment names it)
 *   "qemu:///system"      -> the listener's upstream, else default_upstream
 *   ""                    -> that upstream's own URI name ("qemu:///system")
 *   routing.strict: "qemu:///system" and "qemu:///hv9/system" are errors naming the upstreams
 *   (a listener with its own upstream is not strict: its clients use ordinary names)
 */
#ifndef VM_ROUTER_H
#define VM_ROUTER_H

#include <stddef.h>

#include "fwd.h"

struct vm_route {
    const struct vm_upstream_cfg *upstream;
    char *name; /* what to send upstream in CONNECT_OPEN; owned by the route */
};

/* Resolve `name` (as sent by the client) for a client of a listener whose fallback upstream is
 * `listener_upstream` (may be NULL). Returns 0 and fills `r`, or -1 with the client-facing
 * message in err (no libvirt prefix). */
int router_resolve(const struct vm_config *cfg, const char *listener_upstream, const char *name,
                   struct vm_route *r, char *err, size_t errlen) VM_WUR;
void route_clear(struct vm_route *r);

#endif
