/* What signals do to the gateway: SIGTERM/SIGINT drain it, SIGHUP reloads the whole config.
 * Both work on gateway.c's state through gateway_int.h. */
#include "gateway.h"
#include "gateway_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "auth.h"
#include "config.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "reap.h"
#include "session.h"
#include "util.h"

/* ---- drain (SIGTERM / SIGINT) ----
 *
 *   1. listeners close (unix socket files go): nobody new comes in; the admin endpoint stays;
 *   2. every session is told to drain: idle ones close now, busy ones once their calls,
 *      streams and registrations have finished; new upstream calls are refused meanwhile;
 *   3. at limits.drain_timeout_s the sessions left are closed, their calls cut off;
 *   4. with no session left, their event registrations are being dropped upstream; every
 *      link with nothing in flight sends CONNECT_CLOSE (libvirtd must not see a connection
 *      vanish with deregistrations pending) and goes once answered, for GOODBYE_S at most;
 *   5. one summary line, and the loop stops (main exits 0).
 */
#define GOODBYE_S 5

static double since(struct vm_gateway *gw, const struct timeval *t0)
{
    struct timeval now, d;
    event_base_gettimeofday_cached(gw->base, &now);
    evutil_timersub(&now, t0, &d);
    return (double)d.tv_sec + d.tv_usec / 1e6;
}

static void drain_finish(struct vm_gateway *gw, int complete)
{
    struct gateway_drain *d = &gw->drain;
    event_del(d->tick);
    event_del(d->deadline);
    if (!complete)
        vm_warn(NULL, "drain: upstream connections still busy after %d s of goodbyes: "
                "closing them", GOODBYE_S);
    vm_info(NULL, "drained in %.1f s: %d sessions closed, %d calls completed, %d calls cut "
            "off at the %d s timeout", since(gw, &d->started), d->sessions,
            d->calls - d->cut_off, d->cut_off, gw->cfg->drain_timeout_s);
    event_base_loopexit(gw->base, NULL);
}

static void drain_tick(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    struct gateway_drain *d = &gw->drain;
    for (int i = gw->nsessions - 1; i >= 0; i--) /* backwards: a session may leave */
        if (i < gw->nsessions)
            session_drain(gw->sessions[i]);
    if (gw->nsessions > 0)
        return;
    struct timeval now;
    event_base_gettimeofday_cached(gw->base, &now);
    if (!d->upstream_phase) {
        d->upstream_phase = 1;
        struct timeval add = {GOODBYE_S, 0};
        evutil_timeradd(&now, &add, &d->goodbye_until);
        vm_info(NULL, "drain: every session closed; closing upstream connections");
    }
    /* A retired link may empty its pool, which then leaves the list: step ahead first. */
    struct pool_node *n, *next;
    for (n = LIST_FIRST(&gw->pools); n; n = next) {
        next = LIST_NEXT(n, entry);
        (void)pool_retire_idle(n->pool);
    }
    if (LIST_EMPTY(&gw->pools) && TAILQ_EMPTY(&gw->retiring))
        drain_finish(gw, 1);
    else if (evutil_timercmp(&now, &d->goodbye_until, >))
        drain_finish(gw, 0);
}

static void drain_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    struct gateway_drain *d = &gw->drain;
    for (int i = 0; i < gw->nsessions; i++)
        d->cut_off += session_outstanding(gw->sessions[i]);
    if (gw->nsessions)
        vm_warn(NULL, "drain timeout (%d s): closing %d sessions, cutting off %d calls",
                gw->cfg->drain_timeout_s, gw->nsessions, d->cut_off);
    while (gw->nsessions > 0)
        session_close(gw->sessions[gw->nsessions - 1], "drain timeout: virtmux is stopping");
    drain_tick(-1, 0, gw);
}

void gateway_drain(struct vm_gateway *gw)
{
    struct gateway_drain *d = &gw->drain;
    if (d->on)
        return;
    d->on = 1;
    event_base_gettimeofday_cached(gw->base, &d->started);
    gateway_close_listeners(gw);
    d->sessions = gw->nsessions;
    for (int i = 0; i < gw->nsessions; i++)
        d->calls += session_outstanding(gw->sessions[i]);
    vm_info(NULL, "draining: listeners closed; %d sessions, %d calls outstanding; waiting up "
            "to %d s", d->sessions, d->calls, gw->cfg->drain_timeout_s);
    d->deadline = evtimer_new(gw->base, drain_deadline, gw);
    d->tick = event_new(gw->base, -1, EV_PERSIST, drain_tick, gw);
    struct timeval limit = {gw->cfg->drain_timeout_s, 0}, every = {0, 50000};
    if (!d->deadline || !d->tick || evtimer_add(d->deadline, &limit) < 0 ||
        event_add(d->tick, &every) < 0)
        abort();
    /* Backwards: an idle session leaves the registry at once. */
    for (int i = gw->nsessions - 1; i >= 0; i--)
        if (i < gw->nsessions)
            session_drain(gw->sessions[i]);
}

/* ---- reload (SIGHUP) ----
 *
 *   1. read and validate the whole file into a new snapshot (and its tls:// upstream
 *      contexts); any error: log it, keep running on the old one;
 *   2. keys that cannot change while running (process.*, admin.*, sasl once set up) keep
 *      their running values, moved into the new snapshot (warned when they differ);
 *   3. listeners, matched by name: same socket -> kept, described by the new entry, TLS files
 *      re-read; otherwise a new socket. New sockets that collide with an old listener that
 *      goes are bound once it is closed; any other bind failure undoes step 3 and refuses;
 *   4. swap: the new snapshot is current (env->cfg: new OPENs, policy, limits, keepalive);
 *      the old one waits until no session, pool or link points into it. Existing sessions
 *      keep their listener entry, rule and pool; pools of removed or changed upstreams
 *      drain as their sessions leave.
 */

#define SWAP(a, b)                                                                                 \
    do {                                                                                           \
        __typeof__(a) tmp_ = (a);                                                                  \
        (a) = (b);                                                                                 \
        (b) = tmp_;                                                                                \
    } while (0)

/* Step 2: the running values move into `nc`, the values read go with the old snapshot. */
static void keep_restart_keys(struct vm_config *oc, struct vm_config *nc)
{
    if (!vm_streq(oc->process_user, nc->process_user) ||
        !vm_streq(oc->process_group, nc->process_group))
        vm_warn(NULL, "reload: process.user/process.group changed: this needs a restart; "
                "keeping the running ones");
    SWAP(oc->process_user, nc->process_user);
    SWAP(oc->process_group, nc->process_group);
    if (!vm_streq(oc->admin_address, nc->admin_address) ||
        !vm_streq(oc->admin_unix, nc->admin_unix))
        vm_warn(NULL, "reload: admin.address/admin.unix changed: this needs a restart; "
                "keeping the running endpoint");
    SWAP(oc->admin_address, nc->admin_address);
    SWAP(oc->admin_unix, nc->admin_unix);
    /* cyrus-sasl is set up once, with the running section (auth.c keeps a pointer to it). A
     * first sasl section is set up by the caller. */
    if (oc->sasl) {
        if (!config_sasl_same(oc->sasl, nc->sasl))
            vm_warn(NULL, "reload: the sasl section changed: this needs a restart; keeping "
                    "the running one");
        SWAP(oc->sasl, nc->sasl);
    }
}

static int clashes(const struct vm_listener_cfg *a, const struct vm_listener_cfg *b)
{
    return (a->address && vm_streq(a->address, b->address)) ||
           (a->unix_path && vm_streq(a->unix_path, b->unix_path));
}

/* Step 3. `nl` gets one listener per entry of `nc` (NULL where binding failed after the
 * point of no return); `keep[j]` says old listener j lives on. -1: nothing changed. */
static int swap_listeners(struct vm_gateway *gw, struct vm_config *nc, struct vm_listener **nl,
                          int *keep, int *opened, int *closed)
{
    struct vm_config *oc = gw->cfg;
    int *later = vm_calloc((size_t)nc->nlisteners, sizeof(int));
    for (int i = 0; i < nc->nlisteners; i++) {
        const struct vm_listener_cfg *want = &nc->listeners[i];
        for (int j = 0; j < oc->nlisteners; j++) {
            if (!keep[j] && gw->listeners[j] && vm_streq(oc->listeners[j].name, want->name) &&
                config_listener_same_socket(&oc->listeners[j], want)) {
                keep[j] = 1;
                nl[i] = gw->listeners[j];
                break;
            }
        }
    }
    for (int i = 0; i < nc->nlisteners; i++) {
        if (nl[i])
            continue;
        for (int j = 0; j < oc->nlisteners; j++)
            if (!keep[j] && clashes(&nc->listeners[i], &oc->listeners[j]))
                later[i] = 1;
        if (later[i])
            continue;
        nl[i] = listener_new(gw->base, &nc->listeners[i], &gateway_listener_ops, gw,
                             nc->auth_timeout_s * 1000);
        if (!nl[i]) {
            vm_err(NULL, "reload refused: listeners[%d] (%s) cannot be opened; keeping the "
                   "running configuration", i, nc->listeners[i].name);
            for (int k = 0; k < nc->nlisteners; k++) {
                int kept = 0;
                for (int j = 0; j < oc->nlisteners; j++)
                    kept |= keep[j] && gw->listeners[j] == nl[k];
                if (nl[k] && !kept)
                    listener_free(nl[k]);
            }
            free(later);
            return -1;
        }
        (*opened)++;
    }
    /* The point of no return: old sockets that go are closed (unix files removed). */
    for (int j = 0; j < oc->nlisteners; j++) {
        if (keep[j] || !gw->listeners[j])
            continue;
        listener_free(gw->listeners[j]);
        gw->listeners[j] = NULL;
        (*closed)++;
    }
    for (int i = 0; i < nc->nlisteners; i++) {
        if (!later[i])
            continue;
        nl[i] = listener_new(gw->base, &nc->listeners[i], &gateway_listener_ops, gw,
                             nc->auth_timeout_s * 1000);
        if (nl[i])
            (*opened)++;
        else
            vm_err(NULL, "reload: listeners[%d] (%s) could not be reopened: it stays closed "
                   "until the next reload", i, nc->listeners[i].name);
    }
    free(later);
    return 0;
}

static void log_upstream_changes(const struct vm_config *oc, const struct vm_config *nc)
{
    for (int i = 0; i < nc->nupstreams; i++) {
        const struct vm_upstream_cfg *was = config_upstream(oc, nc->upstreams[i].name);
        if (!was)
            vm_info(NULL, "reload: upstream %s added: %s", nc->upstreams[i].name,
                    nc->upstreams[i].uri_text);
        else if (!config_upstream_same(was, &nc->upstreams[i]))
            vm_info(NULL, "reload: upstream %s changed: new sessions get new connections; "
                    "the old ones serve their sessions until they leave", was->name);
    }
    for (int i = 0; i < oc->nupstreams; i++)
        if (!config_upstream(nc, oc->upstreams[i].name))
            vm_info(NULL, "reload: upstream %s removed: its sessions keep working until they "
                    "leave; new ones cannot reach it", oc->upstreams[i].name);
}

int gateway_reload(struct vm_gateway *gw, const char *path)
{
    if (gw->drain.on) {
        vm_warn(NULL, "reload ignored: virtmux is draining");
        return -1;
    }
    char *errs = NULL;
    size_t nerrs = 0;
    FILE *ef = open_memstream(&errs, &nerrs);
    struct vm_config *nc = config_load(path, ef ? ef : stderr);
    if (ef)
        fclose(ef);
    if (!nc) {
        for (char *line = errs, *end; line && *line; line = end) {
            end = line + strcspn(line, "\n");
            if (*end)
                *end++ = '\0';
            vm_err(NULL, "reload: %s", line);
        }
        vm_err(NULL, "reload refused: %s is invalid; keeping the running configuration", path);
        free(errs);
        return -1;
    }
    free(errs);
    struct snapshot *sn = gateway_snapshot_new(nc);
    if (gateway_snapshot_load_tls(sn) < 0) {
        vm_err(NULL, "reload refused: keeping the running configuration");
        gateway_snapshot_free(sn);
        return -1;
    }
    struct vm_config *oc = gw->cfg;
    struct vm_listener **nl = vm_calloc((size_t)nc->nlisteners + 1, sizeof(*nl));
    int *keep = vm_calloc((size_t)oc->nlisteners + 1, sizeof(int));
    int opened = 0, closed = 0;
    if (swap_listeners(gw, nc, nl, keep, &opened, &closed) < 0) {
        free(nl);
        free(keep);
        gateway_snapshot_free(sn);
        return -1;
    }
    keep_restart_keys(oc, nc);
    if (!oc->sasl && nc->sasl && auth_global_init(nc->sasl) < 0)
        vm_err(NULL, "reload: cyrus-sasl could not be set up: SASL logins will fail");
    for (int i = 0; i < nc->nlisteners; i++) {
        for (int j = 0; j < oc->nlisteners; j++) {
            if (keep[j] && gw->listeners[j] == nl[i]) {
                listener_set_cfg(nl[i], &nc->listeners[i]);
                (void)listener_reload_tls(nl[i]);
            }
        }
    }
    log_upstream_changes(oc, nc);
    free(keep);
    free(gw->listeners);
    gw->listeners = nl;
    LIST_INSERT_HEAD(&gw->old, gw->snap, entry);
    gw->snap = sn;
    gw->cfg = nc;
    gw->env.cfg = nc;
    /* New upstreams and listeners have their counters from now on (at zero). */
    for (int i = 0; i < nc->nupstreams; i++)
        (void)metrics_upstream(gw->metrics, nc->upstreams[i].name);
    for (int i = 0; i < nc->nlisteners; i++)
        (void)metrics_listener(gw->metrics, nc->listeners[i].name);
    /* max_clients may have moved; new listeners follow the accepting state. */
    int accept_now = gw->nsessions < nc->max_clients;
    if (accept_now != gw->accepting)
        gateway_set_accepting(gw, accept_now);
    else if (!accept_now)
        for (int i = 0; i < nc->nlisteners; i++)
            if (nl[i])
                listener_set_enabled(nl[i], 0);
    if (!nc->policy_present)
        vm_info(NULL, "no policy section: every client may reach every upstream read-write");
    vm_info(NULL, "reloaded %s: %d listeners (%d opened, %d closed), %d upstreams, %d policy "
            "rules; sessions already open keep their settings", path, nc->nlisteners, opened,
            closed, nc->nupstreams, nc->nrules);
    gateway_snapshots_collect(gw);
    return 0;
}
