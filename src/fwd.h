/* Forward declarations shared by the engine. Types stay opaque outside their own file. */
#ifndef VM_FWD_H
#define VM_FWD_H

struct vm_config;
struct vm_listener_cfg;
struct vm_upstream_cfg;
struct vm_gateway;
struct vm_listener;
struct vm_session;
struct vm_pool;
struct vm_link;
struct vm_call;

#define VM_WUR __attribute__((warn_unused_result))
#define VM_PRINTF(a, b) __attribute__((format(printf, a, b)))

#endif
