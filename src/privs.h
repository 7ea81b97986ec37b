/* Dropping root: once the gateway has done what needs privileges (listeners and the admin
 * endpoint bound, TLS keys read), it becomes process.user / process.group for good. */
#ifndef VM_PRIVS_H
#define VM_PRIVS_H

#include "fwd.h"

/* With process.user set: set the supplementary groups, the group and the user (real, effective
 * and saved), make sure root cannot be regained, then check that the files read again at run
 * time (sasldb, keytab, upstream password files) are readable. Without it: nothing. Returns -1
 * after logging why; the caller must not serve then. */
int privs_drop(const struct vm_config *cfg) VM_WUR;

#endif
