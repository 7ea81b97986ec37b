/* Object grants: a policy rule's "domains", "networks" and "storage_pools" limit what a session
 * may see and touch. Every procedure says how it names each family (vm_proc_info.objects, from
 * data/procedures.tsv); this module reads the names out of calls, replies and events:
 *
 *   call --grant_check_call--> PASS     forward unchanged
 *                          `-> FILTER   forward (maybe rewritten), the reply goes through
 *                          |            grant_filter_reply (lookups, lists, counts, stats)
 *                          `-> REFUSED  answer *err, never forwarded: "not found" as the
 *                                       driver words it for a missing object (existence is not
 *                                       revealed), or an access error (defining a forbidden
 *                                       name, renaming into one, procedures that cannot be
 *                                       filtered)
 *   event --grant_event_allowed--> deliver or drop, for this subscriber only
 *
 * libvirt drivers find the object a handle names by its UUID (the test driver: networks and
 * pools by name), so a call may name a domain, network or pool only by a handle this session
 * was shown by the gateway, in a lookup, list, stats, define or create reply or an event,
 * each filtered first (networks and pools: UUID and name both). Real clients only hold such
 * handles; a forged or guessed one is "not found". A volume names its pool by name: checked
 * by name. At most VM_GRANT_SEEN_MAX handles are remembered per family. */
#ifndef VM_GRANT_H
#define VM_GRANT_H

#include <stddef.h>
#include <stdint.h>

#include "wire.h"

struct evbuffer;
struct vm_proc_info;
struct vm_grant;

#define VM_GRANT_SEEN_MAX 65536

/* Is `name` granted by `patterns` (NULL-terminated globs, "!glob" excludes; NULL grants
 * everything)? Granted when it matches some plain pattern and no "!" pattern, whatever their
 * order. */
int grant_allows(char *const *patterns, const char *name);

/* A session's grant. The pattern lists (NULL = that family is not limited) must outlive it
 * (the config snapshot); `opened_name` is the name the session opened, which tells the driver
 * and so the wording and error domain of "not found" ("test:///default", "qemu:///system").
 * NULL when no list is given. */
struct vm_grant *grant_new(char *const *domains, char *const *networks,
                           char *const *storage_pools, const char *opened_name);
void grant_free(struct vm_grant *g);

enum vm_grant_verdict { VM_GRANT_PASS, VM_GRANT_FILTER, VM_GRANT_REFUSED };

/* An error to answer instead of forwarding: libvirt's error fields. */
struct vm_grant_error {
    int code;
    int domain;
    char message[600];
    char str1[48];  /* the format libvirt reports in str1 ("" = none) */
    char str2[560]; /* its detail in str2 ("" = none) */
};

/* What a FILTER call needs again at its reply (kept in the call record). */
struct vm_grant_memo {
    uint32_t aux;  /* a list's size limit, or whether the client wanted the list */
    char *note;    /* malloc'd: the key or path looked up, for the wording; or NULL */
};

/* Check the call in `pkt` (the whole packet). FILTER may rewrite `pkt` into the call to send
 * upstream (header proc included) and fills *memo; REFUSED fills *err. */
enum vm_grant_verdict grant_check_call(struct vm_grant *g, const struct vm_proc_info *info,
                                       struct evbuffer *pkt, struct vm_grant_memo *memo,
                                       struct vm_grant_error *err);

/* Append to `out` the reply the client gets for a FILTER call whose header was `call`: the
 * upstream reply `reply` (whole packet) with what the grant excludes taken out (lists, stats,
 * counts) or turned into "not found" (lookups), as `call`'s procedure and serial. The handles
 * shown are remembered. `reply` is drained. */
void grant_filter_reply(struct vm_grant *g, const struct vm_proc_info *info,
                        const struct vm_grant_memo *memo, const struct vm_hdr *call,
                        struct evbuffer *reply, struct evbuffer *out);

/* May an event packet (whole, `len` bytes) reach this subscriber? Events that name nothing
 * limited always may; one that cannot be read may not. A handle delivered is remembered. */
int grant_event_allowed(struct vm_grant *g, const struct vm_proc_info *info, const void *pkt,
                        size_t len);

#endif
