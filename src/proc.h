/* The procedure table: every procedure of the REMOTE, QEMU, LXC and KEEPALIVE programs with
 * its kind and read-only verdict. The table itself is generated at build time from
 * data/procedures.tsv by tools/gen-proctable.py. */
#ifndef VM_PROC_H
#define VM_PROC_H

#include <stddef.h>
#include <stdint.h>

#include "wire.h"

enum vm_proc_kind {
    VM_PK_CALL,
    VM_PK_EVENT,
    VM_PK_EVENT_REGISTER,
    VM_PK_EVENT_DEREGISTER,
    VM_PK_STREAM_CREATE,
    VM_PK_AUTH,
    VM_PK_CONNECTION,
    VM_PK_KEEPALIVE,
};

enum vm_proc_ro { VM_RO_YES, VM_RO_NO, VM_RO_FLAGS };

/* For VM_RO_FLAGS: what precedes the deciding word in the arguments (read from the front, as
 * libvirtd does: trailing bytes are ignored there, so they must not hide a flag here). */
enum vm_ro_arg {
    VM_RO_ARG_NONE,
    VM_RO_ARG_DOM,      /* remote_nonnull_domain {string name; uuid[16]; int id} */
    VM_RO_ARG_NAME_DOM, /* {string name; remote_nonnull_domain dom} (snapshot, checkpoint) */
};
enum vm_ro_test { VM_RO_TEST_MASK, VM_RO_TEST_EQUALS };

/* The object families a policy grant can limit. */
enum vm_obj_family { VM_OBJ_DOMAIN, VM_OBJ_NETWORK, VM_OBJ_STORAGE_POOL, VM_OBJ_FAMILIES };

/* How a procedure names objects of one family (data/procedures.tsv, column "objects"). A
 * handle is the family's remote_nonnull_* struct: a domain {string name; uuid[16]; int id},
 * a network or storage pool {string name; uuid[16]}; a volume {string pool; string name;
 * string key} names its pool by name. */
enum vm_obj_how {
    VM_OBJ_NONE,         /* names none of them */
    VM_OBJ_ARG,          /* arguments start with a handle */
    VM_OBJ_IN_ARG,       /* arguments start with {string name; domain handle} (snapshots) */
    VM_OBJ_XML,          /* arguments start with XML defining one: the name is its <name> */
    VM_OBJ_RENAME,       /* a domain handle, then the new name */
    VM_OBJ_LOOKUP_NAME,  /* arguments start with the name looked up; reply: a handle */
    VM_OBJ_LOOKUP,       /* reply: the handle found (by UUID, id, target path) */
    VM_OBJ_LOOKUP_VOL,   /* arguments start with a volume; reply: its pool's handle */
    VM_OBJ_LIST_ALL,     /* reply: handles + count (need_results honoured) */
    VM_OBJ_STATS_ALL,    /* reply: records starting with a domain handle */
    VM_OBJ_LIST_IDS,     /* reply: ids of the active ones */
    VM_OBJ_LIST_ACTIVE,  /* reply: names of the active ones */
    VM_OBJ_LIST_DEFINED, /* reply: names of the inactive ones */
    VM_OBJ_NUM_ACTIVE,   /* reply: how many are active */
    VM_OBJ_NUM_DEFINED,  /* reply: how many are inactive */
    VM_OBJ_EVENT,        /* an event whose payload starts with a handle */
    VM_OBJ_EVENT_CB,     /* an event: int callbackID, then a handle */
    VM_OBJ_VOL,          /* arguments start with a volume (its pool by name) */
    VM_OBJ_VOL_LOOKUP,   /* reply: a volume (its pool by name) */
    VM_OBJ_CLONE,        /* a pool handle, XML, then the volume to clone */
    VM_OBJ_REFUSE,       /* names them in a way that cannot be filtered safely */
};

struct vm_proc_info {
    uint32_t prog;
    int32_t proc;
    const char *name;
    enum vm_proc_kind kind;
    enum vm_proc_ro ro;
    unsigned fds_in : 1;  /* the call carries file descriptors */
    unsigned fds_out : 1; /* the reply carries file descriptors */
    unsigned cb_first : 1; /* an event whose payload starts with int callbackID */
    unsigned legacy : 1;   /* a legacy (pre-callback) event (de)registration */
    const char *api;      /* public API that refuses it on read-only connections, or NULL */
    int err_domain;       /* libvirt error domain of that API family */
    enum vm_ro_arg ro_arg;
    int ro_word;          /* index of the deciding word after that prefix */
    enum vm_ro_test ro_test;
    uint32_t ro_value;    /* mask or value of the deciding word */
    const char *ro_message; /* refusal text after "operation forbidden: " */
    int32_t family;       /* events: the register procedure whose callback ids they carry;
                           * register/deregister: the register procedure */
    int32_t pair;         /* register <-> deregister counterpart (0 for others) */
    enum vm_obj_how objects[VM_OBJ_FAMILIES]; /* how it names each family, for grants */
};

extern const struct vm_proc_info vm_proc_table[];
extern const size_t vm_proc_table_len;

/* Look up a procedure; NULL when the number is unknown. The result is static. */
const struct vm_proc_info *vm_proc_lookup(uint32_t prog, int32_t proc);
/* Its name for logs ("DOMAIN_GET_INFO"), or "REMOTE_PROC_<n>" written into buf. */
const char *vm_proc_name(uint32_t prog, int32_t proc, char *buf, size_t len);

/* Procedure numbers by name (VM_PROC_CONNECT_OPEN, VM_QEMU_PROC_..., VM_PROC_KEEPALIVE_PING),
 * generated from the same table. */
#include "proc_names.h"

/* Driver features (CONNECT_SUPPORTS_FEATURE) that are properties of one hop. */
enum {
    VM_FEATURE_FD_PASSING = 8,
    VM_FEATURE_PROGRAM_KEEPALIVE = 10,
    VM_FEATURE_REMOTE_EVENT_CALLBACK = 14,
    VM_FEATURE_REMOTE_CLOSE_CALLBACK = 15,
};

#endif
