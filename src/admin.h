/* The admin endpoint: HTTP on a loopback address or a unix socket, GET /status returns the
 * gateway's state as JSON (sessions, pools, upstream connections, policy denials). */
#ifndef VM_ADMIN_H
#define VM_ADMIN_H

#include "fwd.h"

struct vm_admin;

/* Start the endpoint configured in `admin`; NULL after logging why. */
struct vm_admin *admin_new(struct vm_gateway *gw);
void admin_free(struct vm_admin *a);

#endif
