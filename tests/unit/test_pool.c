/* pool_submit and the queue, table-driven, with fake links: this file defines the link_*
 * functions pool.c and events.c call, so the real upstream.c is never linked in. Each case
 * sets up links in given states and loads, submits one call, and checks where it went. */
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "call.h"
#include "check.h"
#include "config.h"
#include "env.h"
#include "metrics.h"
#include "pool.h"
#include "reap.h"
#include "upstream.h"

/* ---- fake links ---- */

struct vm_link {
    enum vm_link_state state;
    int inflight, max, refs, sent, draining;
    const struct vm_link_ops *ops;
    void *owner;
    struct vm_call *last;
};

static struct vm_link *made[16];
static int nmade;
static struct vm_call *sent[64]; /* calls on the fake wire, not answered yet */
static int nsent;

struct vm_link *link_new(const struct vm_link_params *p, const struct vm_link_ops *ops,
                         void *owner)
{
    struct vm_link *l = calloc(1, sizeof(*l));
    l->state = VM_LINK_CONNECTING;
    l->max = p->up->pool.max_inflight;
    l->ops = ops;
    l->owner = owner;
    made[nmade++] = l;
    return l;
}

void link_free(struct vm_link *l)
{
    l->ops->gone(l->owner, l);
}

void link_retire(struct vm_link *l)
{
    link_free(l);
}

enum vm_link_state link_state(const struct vm_link *l) { return l->state; }
int link_refs(const struct vm_link *l) { return l->refs; }
int link_inflight(const struct vm_link *l) { return l->inflight; }
int link_internal(const struct vm_link *l) { return 0; }
int link_has_room(const struct vm_link *l) { return l->inflight < l->max; }
const char *link_tag(const struct vm_link *l) { return "U#fake"; }
void link_ref(struct vm_link *l) { l->refs++; }
void link_unref(struct vm_link *l) { l->refs--; }
void link_reconnect_now(struct vm_link *l) { l->state = VM_LINK_CONNECTING; }
void link_set_draining(struct vm_link *l, int on) { l->draining = on; }

void link_send(struct vm_link *l, struct vm_call *c)
{
    sent[nsent++] = c;
    l->inflight++;
    l->sent++;
    c->link = l;
    l->last = c;
}

int link_send_internal(struct vm_link *l, uint32_t prog, int32_t proc, const void *args,
                       size_t n, vm_call_done_fn done, void *arg)
{
    return -1;
}

/* Answer the call in flight on `l` (frees it) and tell the pool the slot is free. */
static void unsend(struct vm_call *c)
{
    for (int i = 0; i < nsent; i++)
        if (sent[i] == c) {
            sent[i] = sent[--nsent];
            return;
        }
}

static void answer(struct vm_link *l)
{
    struct vm_call *c = l->last;
    unsend(c);
    l->inflight--;
    l->last = NULL;
    call_fail(c, 0, 0, "answered");
    l->ops->slot_free(l->owner, l);
}

static void make_ready(struct vm_link *l)
{
    l->state = VM_LINK_READY;
    l->ops->ready(l->owner, l);
}

/* ---- the calls' owner ---- */

static int ended, last_code;
static char last_msg[512];

static void call_done(void *arg, struct vm_call *c, const struct vm_hdr *reply,
                      struct evbuffer *pkt, const struct vm_call_error *err)
{
    ended++;
    last_code = err ? err->code : -1;
    snprintf(last_msg, sizeof(last_msg), "%s", err ? err->message : "");
}

static struct vm_call *new_call(void)
{
    return call_new(call_done, NULL, 0);
}

/* ---- the owner of the pool ---- */

static void maybe_empty(void *owner, struct vm_pool *p) {}
static void link_lost(void *owner, struct vm_link *l, const char *why) {}
static const struct vm_pool_ops ops = {.maybe_empty = maybe_empty, .link_lost = link_lost};

struct fixture {
    struct event_base *base;
    struct vm_config *cfg;
    struct vm_env env;
    struct vm_pool *p;
};

/* hold_ms < 0: pool.reconnect_hold_ms left at its default. */
static void setup_hold(struct fixture *f, int max_connections, int queue_timeout_ms, int hold_ms)
{
    char json[600], hold[64] = "";
    if (hold_ms >= 0)
        snprintf(hold, sizeof(hold), ",\"reconnect_hold_ms\":%d", hold_ms);
    snprintf(json, sizeof(json),
             "{\"listeners\":[{\"address\":\"127.0.0.1:1\"}],"
             " \"upstreams\":[{\"name\":\"hv1\",\"uri\":\"test+tcp://127.0.0.1:2/default\","
             "   \"pool\":{\"max_connections\":%d,\"max_inflight\":2%s}}],"
             " \"limits\":{\"queue_timeout_ms\":%d}}",
             max_connections, hold, queue_timeout_ms);
    f->base = event_base_new();
    f->cfg = config_parse(json, stderr);
    f->env = (struct vm_env){.base = f->base, .reaper = reaper_new(f->base), .cfg = f->cfg,
                             .metrics = metrics_new()};
    f->p = pool_new(&f->env, &ops, NULL, &f->cfg->upstreams[0], "test:///default", 0, NULL);
    nmade = ended = nsent = 0;
    last_code = 0;
    last_msg[0] = 0;
}

static void setup(struct fixture *f, int max_connections, int queue_timeout_ms)
{
    setup_hold(f, max_connections, queue_timeout_ms, -1);
}

static void teardown(struct fixture *f)
{
    while (nsent > 0) /* sent and never answered: the link would fail them */
        call_free(sent[--nsent]);
    pool_free(f->p);
    reaper_free(f->env.reaper);
    metrics_free(f->env.metrics);
    config_free(f->cfg);
    event_base_free(f->base);
    for (int i = 0; i < nmade; i++)
        free(made[i]);
}

/* Give the pool `n` links in `states` with `loads` calls in flight each (max_inflight 2). */
static void grow(struct fixture *f, int n, const enum vm_link_state *states, const int *loads)
{
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < i; j++)
            made[j]->inflight = made[j]->max; /* full: the pool must open another */
        pool_submit(f->p, NULL, new_call());
        CHECK(nmade == i + 1);
        make_ready(made[i]); /* ... and the queued call goes out on it */
        CHECK(made[i]->sent == 1);
        answer(made[i]);
        made[i]->sent = 0;
        ended--;
    }
    for (int i = 0; i < n; i++) {
        made[i]->state = states[i];
        made[i]->inflight = loads[i];
    }
}

enum where { ON_LINK, QUEUED_NEW_LINK, QUEUED, FAILED };

static const struct pcase {
    const char *name;
    int max_connections;
    int nlinks;
    enum vm_link_state states[3];
    int loads[3];
    int home;           /* index, or -1 */
    enum where want;
    int on;             /* the link it must go out on (ON_LINK) */
} cases[] = {
    {"home ready with room", 2, 2, {VM_LINK_READY, VM_LINK_READY}, {1, 0}, 0, ON_LINK, 0},
    {"home full: spill to the least loaded", 3, 3, {VM_LINK_READY, VM_LINK_READY, VM_LINK_READY},
     {2, 1, 0}, 0, ON_LINK, 2},
    {"no home: least loaded", 2, 2, {VM_LINK_READY, VM_LINK_READY}, {1, 0}, -1, ON_LINK, 1},
    {"all full, room to grow", 3, 2, {VM_LINK_READY, VM_LINK_READY}, {2, 2}, 0, QUEUED_NEW_LINK, 0},
    {"all full at max_connections", 2, 2, {VM_LINK_READY, VM_LINK_READY}, {2, 2}, 0, QUEUED, 0},
    {"home in backoff, another ready", 2, 2, {VM_LINK_BACKOFF, VM_LINK_READY}, {0, 1}, 0,
     ON_LINK, 1},
    {"only a link connecting", 1, 1, {VM_LINK_CONNECTING}, {0}, -1, QUEUED, 0},
    {"only a link in handshake", 1, 1, {VM_LINK_HANDSHAKE}, {0}, 0, QUEUED, 0},
    {"everything in backoff at max", 2, 2, {VM_LINK_BACKOFF, VM_LINK_BACKOFF}, {0, 0}, 0, FAILED, 0},
    {"backoff, but room to grow", 2, 1, {VM_LINK_BACKOFF}, {0}, 0, QUEUED_NEW_LINK, 0},
};

static void run_case(const struct pcase *pc)
{
    struct fixture f;
    setup(&f, pc->max_connections, 30000);
    grow(&f, pc->nlinks, pc->states, pc->loads);
    struct vm_call *c = new_call();
    pool_submit(f.p, pc->home >= 0 ? made[pc->home] : NULL, c);
    int sent_on = -1;
    for (int i = 0; i < pc->nlinks; i++)
        if (made[i]->sent)
            sent_on = i;
    switch (pc->want) {
    case ON_LINK:
        CHECK(sent_on == pc->on);
        CHECK(ended == 0);
        break;
    case QUEUED_NEW_LINK:
        CHECK(sent_on == -1 && ended == 0);
        CHECK(nmade == pc->nlinks + 1);
        break;
    case QUEUED:
        CHECK(sent_on == -1 && ended == 0);
        CHECK(nmade == pc->nlinks);
        break;
    case FAILED:
        CHECK(sent_on == -1 && ended == 1);
        CHECK(strstr(last_msg, "cannot reach upstream hv1") != NULL);
        break;
    }
    if (check_fail)
        fprintf(stderr, "  in case: %s\n", pc->name);
    teardown(&f);
}

/* Queued calls leave in FIFO order as slots free, and a newcomer never jumps the queue. */
static void free_slot(struct vm_link *l)
{
    l->inflight--;
    l->ops->slot_free(l->owner, l);
}

static void test_fifo(void)
{
    struct fixture f;
    setup(&f, 1, 30000);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {2};
    grow(&f, 1, st, load);
    struct vm_call *a = new_call(), *b = new_call(), *c = new_call();
    pool_submit(f.p, made[0], a);
    pool_submit(f.p, made[0], b);
    CHECK(made[0]->sent == 0);
    free_slot(made[0]);
    CHECK(made[0]->sent == 1 && made[0]->last == a);
    pool_submit(f.p, made[0], c); /* behind b */
    free_slot(made[0]);
    CHECK(made[0]->sent == 2 && made[0]->last == b);
    free_slot(made[0]);
    CHECK(made[0]->sent == 3 && made[0]->last == c);
    CHECK(ended == 0);
    teardown(&f);
}

/* Owners take turns: a deep pipeline from one does not hold another's call back. */
static void test_turns(void)
{
    struct fixture f;
    setup(&f, 1, 30000);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {2};
    grow(&f, 1, st, load);
    struct vm_fair a, b;
    TAILQ_INIT(&a.calls);
    TAILQ_INIT(&b.calls);
    struct vm_call *ca[4], *cb;
    for (int i = 0; i < 4; i++) {
        ca[i] = new_call();
        ca[i]->fair = &a;
        pool_submit(f.p, made[0], ca[i]);
    }
    cb = new_call();
    cb->fair = &b;
    pool_submit(f.p, made[0], cb); /* arrives after all of a's */
    struct vm_call *want[] = {ca[0], cb, ca[1], ca[2], ca[3]};
    for (int i = 0; i < 5; i++) {
        free_slot(made[0]);
        CHECK(made[0]->last == want[i]);
    }
    CHECK(TAILQ_EMPTY(&a.calls) && TAILQ_EMPTY(&b.calls));
    teardown(&f);
}

/* A call that waits longer than queue_timeout_ms ends with "operation timed out". */
static void test_queue_timeout(void)
{
    struct fixture f;
    setup(&f, 1, 50);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {2};
    grow(&f, 1, st, load);
    pool_submit(f.p, made[0], new_call());
    CHECK(ended == 0);
    struct timeval tv = {0, 300000};
    event_base_loopexit(f.base, &tv);
    event_base_dispatch(f.base);
    CHECK(ended == 1);
    CHECK(last_code == 68); /* VIR_ERR_OPERATION_TIMEOUT */
    CHECK(strstr(last_msg, "operation timed out: virtmux waited 50 ms") != NULL);
    teardown(&f);
}

/* When the last link goes down, waiting calls fail at once instead of timing out. */
static void test_down_fails_queue(void)
{
    struct fixture f;
    setup(&f, 1, 30000);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {2};
    grow(&f, 1, st, load);
    pool_submit(f.p, made[0], new_call());
    made[0]->state = VM_LINK_BACKOFF;
    made[0]->ops->down(made[0]->owner, made[0], NULL, 0, "Connection refused");
    CHECK(ended == 1);
    CHECK(strstr(last_msg, "Connection refused") != NULL);
    teardown(&f);
}

static void run_loop(struct fixture *f, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
}

/* One READY link with a session homed on it (refs 1), with both slots busy and one call
 * queued when `busy`, then libvirtd goes away: the link backs off and will retry. */
static void home_link_goes_down(struct fixture *f, int busy)
{
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {busy ? 2 : 0};
    grow(f, 1, st, load);
    made[0]->refs = 1;
    if (busy)
        pool_submit(f->p, made[0], new_call()); /* waits for a slot */
    made[0]->state = VM_LINK_BACKOFF;
    made[0]->inflight = 0; /* the link failed those itself */
    made[0]->ops->down(made[0]->owner, made[0], NULL, 0, "Connection refused");
}

/* A link with sessions is reconnecting: queued and new calls wait, then go out in order once
 * it is back; no new link is opened per held call. */
static void test_hold_across_reconnect(void)
{
    struct fixture f;
    setup_hold(&f, 1, 30000, 5000);
    home_link_goes_down(&f, 1);
    CHECK(ended == 0);
    struct vm_call *later = new_call();
    pool_submit(f.p, made[0], later);
    CHECK(ended == 0 && nmade == 1);
    json_t *st = pool_status_json(f.p);
    CHECK(json_is_true(json_object_get(st, "holding")));
    json_decref(st);
    made[0]->state = VM_LINK_CONNECTING;
    make_ready(made[0]);
    CHECK(made[0]->sent == 2 && made[0]->last == later && ended == 0);
    st = pool_status_json(f.p);
    CHECK(json_is_false(json_object_get(st, "holding")));
    json_decref(st);
    teardown(&f);

    /* room to grow: still no new link per held call, the backing-off one will retry */
    setup_hold(&f, 2, 30000, 5000);
    home_link_goes_down(&f, 0);
    pool_submit(f.p, made[0], new_call());
    pool_submit(f.p, made[0], new_call());
    CHECK(ended == 0 && nmade == 1);
    made[0]->state = VM_LINK_CONNECTING;
    make_ready(made[0]);
    CHECK(made[0]->sent == 2 && ended == 0);
    teardown(&f);
}

/* A held call gives up after reconnect_hold_ms with the connection error and the wait. */
static void test_hold_expires(void)
{
    struct fixture f;
    setup_hold(&f, 1, 30000, 50);
    home_link_goes_down(&f, 1);
    pool_submit(f.p, made[0], new_call());
    CHECK(ended == 0);
    run_loop(&f, 300);
    CHECK(ended == 2);
    CHECK(last_code == 1); /* VIR_ERR_INTERNAL_ERROR */
    CHECK(strstr(last_msg, "cannot reach upstream hv1") != NULL);
    CHECK(strstr(last_msg, "Connection refused (the call waited 50 ms)") != NULL);
    teardown(&f);
}

/* reconnect_hold_ms 0: the old behaviour, the queue fails at once. */
static void test_no_hold(void)
{
    struct fixture f;
    setup_hold(&f, 1, 30000, 0);
    home_link_goes_down(&f, 1);
    CHECK(ended == 1 && strstr(last_msg, "Connection refused") != NULL);
    pool_submit(f.p, made[0], new_call());
    CHECK(ended == 2);
    teardown(&f);
}

/* Paused: nothing is sent, not even on a READY link with room; resume sends in order. */
static void test_pause_resume(void)
{
    struct fixture f;
    setup(&f, 2, 30000);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {0};
    grow(&f, 1, st, load);
    pool_set_op(f.p, VM_UP_PAUSED);
    struct vm_call *a = new_call(), *b = new_call();
    pool_submit(f.p, made[0], a);
    pool_submit(f.p, made[0], b);
    CHECK(made[0]->sent == 0 && ended == 0 && nmade == 1);
    free_slot(made[0]); /* a slot freeing up sends nothing either */
    made[0]->inflight = 0;
    CHECK(made[0]->sent == 0);
    pool_set_op(f.p, VM_UP_ACTIVE);
    CHECK(made[0]->sent == 2 && made[0]->last == b && ended == 0);
    teardown(&f);
}

/* Paused with a short hold: the call fails after it, naming the pause. */
static void test_pause_hold_expires(void)
{
    struct fixture f;
    setup_hold(&f, 1, 30000, 50);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {0};
    grow(&f, 1, st, load);
    pool_set_op(f.p, VM_UP_PAUSED);
    pool_submit(f.p, made[0], new_call());
    run_loop(&f, 300);
    CHECK(ended == 1 && strstr(last_msg, "upstream hv1 is paused") != NULL);
    teardown(&f);
}

static int opened, open_failed;
static char open_msg[600];

static void open_done(struct vm_open_wait *w, struct vm_link *home, const void *err, size_t n,
                      const char *message)
{
    if (home) {
        opened++;
        return;
    }
    open_failed++;
    snprintf(open_msg, sizeof(open_msg), "%s", err ? "(payload)" : message);
}

/* Draining: new OPENs are refused even with a READY link; the links are told to close once
 * unused; resume undoes it. */
static void test_drain(void)
{
    struct fixture f;
    setup(&f, 1, 30000);
    enum vm_link_state st[] = {VM_LINK_READY};
    int load[] = {0};
    grow(&f, 1, st, load);
    opened = open_failed = 0;
    struct vm_open_wait w = {.done = open_done};
    pool_set_op(f.p, VM_UP_DRAINING);
    CHECK(made[0]->draining == 1);
    pool_open(f.p, &w);
    CHECK(opened == 0 && open_failed == 1);
    CHECK(strstr(open_msg, "upstream hv1 is draining") != NULL);
    pool_submit(f.p, made[0], new_call()); /* existing sessions carry on */
    CHECK(made[0]->sent == 1);
    json_t *js = pool_status_json(f.p);
    CHECK(strcmp(json_string_value(json_object_get(js, "operator")), "draining") == 0);
    json_decref(js);
    pool_set_op(f.p, VM_UP_ACTIVE);
    CHECK(made[0]->draining == 0);
    pool_open(f.p, &w);
    CHECK(opened == 1);
    pool_release(f.p, made[0]);
    teardown(&f);
}

/* While the pool is held for a reconnect, a new session's OPEN waits too: answered when the
 * link is back, or failed after the hold. */
static void test_open_held(void)
{
    struct fixture f;
    setup_hold(&f, 2, 30000, 5000);
    home_link_goes_down(&f, 0);
    opened = open_failed = 0;
    struct vm_open_wait w = {.done = open_done};
    pool_open(f.p, &w);
    CHECK(opened == 0 && open_failed == 0 && nmade == 1);
    made[0]->state = VM_LINK_CONNECTING;
    make_ready(made[0]);
    CHECK(opened == 1);
    pool_release(f.p, made[0]);
    teardown(&f);

    setup_hold(&f, 1, 30000, 50);
    home_link_goes_down(&f, 0);
    opened = open_failed = 0;
    pool_open(f.p, &w);
    CHECK(opened == 0 && open_failed == 0);
    run_loop(&f, 300);
    CHECK(open_failed == 1);
    CHECK(strstr(open_msg, "cannot reach upstream hv1") != NULL);
    CHECK(strstr(open_msg, "(the open waited 50 ms)") != NULL);
    teardown(&f);
}

/* libvirtd refused the name: the next OPENs get the same refusal without a new link, for
 * VM_REFUSAL_CACHE_MS; the pool is not empty meanwhile. */
static void test_refusal_cached(void)
{
    struct fixture f;
    setup(&f, 1, 30000);
    opened = open_failed = 0;
    struct vm_open_wait w = {.done = open_done};
    pool_open(f.p, &w);
    CHECK(nmade == 1);
    static const unsigned char payload[] = {0, 0, 0, 38};
    made[0]->state = VM_LINK_BACKOFF;
    made[0]->ops->down(made[0]->owner, made[0], payload, sizeof(payload), "refused");
    CHECK(open_failed == 1 && strcmp(open_msg, "(payload)") == 0);
    made[0]->ops->gone(made[0]->owner, made[0]); /* freed: refs 0 */
    for (int i = 0; i < 10; i++)
        pool_open(f.p, &w);
    CHECK(open_failed == 11 && nmade == 1);
    CHECK(!pool_is_empty(f.p));
    teardown(&f);
}

int main(void)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(&cases[i]);
    test_fifo();
    test_turns();
    test_queue_timeout();
    test_down_fails_queue();
    test_hold_across_reconnect();
    test_hold_expires();
    test_no_hold();
    test_pause_resume();
    test_pause_hold_expires();
    test_drain();
    test_refusal_cached();
    test_open_held();
    return check_done();
}
