#include "keepalive.h"

#include <string.h>

#include <event2/event.h>

static void keepalive_tick(evutil_socket_t fd, short what, void *arg)
{
    struct vm_keepalive *ka = arg;
    time_t now = time(NULL);
    if (now - ka->last_rx < ka->interval_s)
        return;
    if (ka->left <= 0) {
        keepalive_stop(ka);
        ka->dead(ka->arg);
        return;
    }
    ka->left--;
    ka->send_ping(ka->arg);
}

int keepalive_start(struct vm_keepalive *ka, struct event_base *base, int interval_s, int count,
                    void (*send_ping)(void *), void (*dead)(void *), void *arg)
{
    keepalive_stop(ka);
    ka->interval_s = interval_s;
    ka->count = count;
    ka->left = count;
    ka->last_rx = time(NULL);
    ka->send_ping = send_ping;
    ka->dead = dead;
    ka->arg = arg;
    if (interval_s <= 0)
        return 0;
    ka->timer = event_new(base, -1, EV_PERSIST, keepalive_tick, ka);
    if (!ka->timer)
        return -1;
    struct timeval tv = {interval_s, 0};
    return event_add(ka->timer, &tv);
}

void keepalive_touch(struct vm_keepalive *ka)
{
    ka->last_rx = time(NULL);
    ka->left = ka->count;
}

void keepalive_stop(struct vm_keepalive *ka)
{
    if (ka->timer) {
        event_free(ka->timer);
        ka->timer = NULL;
    }
}
