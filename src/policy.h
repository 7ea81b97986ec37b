/* Per-client policy: which rule applies to an identity (first match wins), what it grants
 * (read-only, upstreams, max_sessions), and the read-only procedure allowlist that guards
 * every call of a read-only session before it can reach an upstream. */
#ifndef VM_POLICY_H
#define VM_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "fwd.h"
#include "wire.h"

struct evbuffer;
struct vm_identity;
struct vm_rule;

/* The rule for `id`: the first matching rule, else the configured default. Never NULL. */
const struct vm_rule *policy_match(const struct vm_config *cfg, const struct vm_identity *id);

/* May a session under `rule` reach upstream `name`? */
int policy_allows_upstream(const struct vm_rule *rule, const char *name);

/* Read-only allowlist. Returns 1 when a read-only session may send the call whose header is
 * `h` and whose whole packet is `pkt`; 0 when it must be refused, with libvirt's message
 * (prefix included) in msg and the error domain in *domain. Unknown procedures, the QEMU and
 * LXC programs, every "no" procedure and every "flags" procedure with the deciding argument
 * set are refused. */
int policy_readonly_allows(const struct vm_hdr *h, struct evbuffer *pkt, char *msg, size_t len,
                           int *domain);

#endif
