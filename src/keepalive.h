/* Per-hop keepalive, the same rule on both sides of the gateway: any packet received resets
 * the counter; after `interval` seconds of silence send a PING and count down; when the count
 * is spent at the next expiry, the peer is dead. Never forwarded across hops. */
#ifndef VM_KEEPALIVE_H
#define VM_KEEPALIVE_H

#include <time.h>

struct event;
struct event_base;

struct vm_keepalive {
    struct event *timer;
    int interval_s;
    int count;
    int left;
    time_t last_rx;
    void (*send_ping)(void *arg);
    void (*dead)(void *arg); /* may free the owner; called last */
    void *arg;
};

/* Arm keepalive; does nothing when interval_s <= 0. Returns -1 on allocation failure. */
int keepalive_start(struct vm_keepalive *ka, struct event_base *base, int interval_s, int count,
                    void (*send_ping)(void *), void (*dead)(void *), void *arg);
/* Note that a packet arrived. Cheap; call on every packet. */
void keepalive_touch(struct vm_keepalive *ka);
void keepalive_stop(struct vm_keepalive *ka);

#endif
