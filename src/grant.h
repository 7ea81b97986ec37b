/* Domain grants: a policy rule's "domains" limits what a session may see and touch. Every
 * procedure says how it names domains (vm_proc_info.dom, from data/procedures.tsv); this
 * module reads the names out of calls, replies and events and decides:
 *
 *   call --grant_check_call--> PASS     forward unchanged
 *                          `-> FILTER   forward (maybe rewritten), reply through
 *                          |            grant_filter_reply (lookups, lists, stats)
 *                          `-> REFUSED  answer *err, never forwarded: "Domain not found" as
 *                                       the driver words it (existence is not revealed), or
 *                                       an access error (defining a forbidden name, renaming
 *                                       into one, procedures that cannot be filtered)
 *   event --grant_event_allowed--> deliver or drop (for this subscriber only)
 *
 * Pure functions over packets: no state, no I/O. */
#ifndef VM_GRANT_H
#define VM_GRANT_H

#include <stddef.h>
#include <stdint.h>

#include "wire.h"

struct evbuffer;
struct vm_proc_info;

/* Is domain `name` granted by `patterns` (NULL-terminated globs, "!glob" excludes; NULL
 * grants everything)? Granted when it matches some plain pattern and no "!" pattern, whatever
 * their order. */
int grant_allows(char *const *patterns, const char *name);

/* A session's grant: its patterns, the error domain its driver reports "Domain not found"
 * under, and the domains the session has been shown. libvirtd finds the domain a call names
 * by its UUID (the name in the packet only decorates error messages), so a call may name a
 * domain only by a UUID this session received from the gateway: in a lookup, list, stats,
 * define or create reply, or an event, each filtered first. Real clients only hold such
 * handles; a forged or guessed UUID is "not found". At most VM_GRANT_SEEN_MAX are kept. */
struct vm_grant;
#define VM_GRANT_SEEN_MAX 65536

/* `patterns` must outlive the grant (the config snapshot); `opened_name` is the name the
 * session opened ("test:///default" -> VIR_FROM_TEST, "qemu:///system" -> VIR_FROM_QEMU). */
struct vm_grant *grant_new(char *const *patterns, const char *opened_name);
void grant_free(struct vm_grant *g);

enum vm_grant_verdict { VM_GRANT_PASS, VM_GRANT_FILTER, VM_GRANT_REFUSED };

/* An error to answer instead of forwarding: libvirt's error fields. */
struct vm_grant_error {
    int code;
    int domain;
    char message[600];
    char str1[48];   /* the format libvirt reports in str1 ("" = none) */
    char str2[560];  /* the detail in str2 ("" = none) */
};

/* Check the call in `pkt` (the whole packet). VM_GRANT_FILTER may rewrite `pkt` into the
 * call to send upstream (header proc included); *aux then holds what grant_filter_reply
 * needs. VM_GRANT_REFUSED fills *err. */
enum vm_grant_verdict grant_check_call(struct vm_grant *g, const struct vm_proc_info *info,
                                       struct evbuffer *pkt, uint32_t *aux,
                                       struct vm_grant_error *err);

/* Append to `out` the reply the client gets for a FILTER call whose header was `call`: the
 * upstream reply `reply` (whole packet) with the domains outside the grant taken out (lists,
 * stats, counts) or turned into "Domain not found" (lookups), as `call`'s procedure and
 * serial. The domains shown are remembered. `reply` is drained. */
void grant_filter_reply(struct vm_grant *g, const struct vm_proc_info *info, uint32_t aux,
                        const struct vm_hdr *call, struct evbuffer *reply,
                        struct evbuffer *out);

/* May an event packet (whole, `len` bytes) reach this subscriber? Events that name no domain
 * always may; a domain event that cannot be read may not. A domain delivered is remembered. */
int grant_event_allowed(struct vm_grant *g, const struct vm_proc_info *info, const void *pkt,
                        size_t len);

/* The name in a domain XML document (the first <name> child of the root <domain>), malloc'd;
 * NULL when it cannot be read unambiguously. Exposed for tests and fuzzing. */
char *grant_xml_domain_name(const char *xml, size_t len);

#endif
