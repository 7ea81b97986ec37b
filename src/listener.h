/* Listeners: a TCP address or a unix socket that accepts libvirt clients into sessions. */
#ifndef VM_LISTENER_H
#define VM_LISTENER_H

#include "fwd.h"

/* Bind the listener described by `cfg`. Returns NULL after logging why. */
struct vm_listener *listener_new(struct vm_gateway *gw, const struct vm_listener_cfg *cfg);
void listener_free(struct vm_listener *l);
/* Stop or resume accepting (used at max_clients). */
void listener_set_enabled(struct vm_listener *l, int on);

#endif
