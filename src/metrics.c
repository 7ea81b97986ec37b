#include "metrics.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>

#include "proc.h"
#include "util.h"
#include "wire.h"

/* Latency buckets (upper bounds), from half a millisecond to ten seconds. */
static const uint64_t bucket_ns[] = {
    500000,    1000000,    2500000,    5000000,    10000000,   25000000,   50000000,
    100000000, 250000000,  500000000,  1000000000, 2500000000, 5000000000, 10000000000,
};
static const char *const bucket_le[] = {
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1",    "0.25",  "0.5",    "1",     "2.5",  "5",     "10",
};
#define NBUCKETS (sizeof(bucket_ns) / sizeof(bucket_ns[0]))

struct hist {
    uint64_t bucket[NBUCKETS + 1]; /* not cumulative; the last one is +Inf */
    uint64_t count;
    uint64_t sum_ns;
};

struct mup {                /* one upstream, by name */
    char *name;             /* owned */
    struct vm_bytes bytes;
    struct hist **hist;     /* owned: vm_proc_table_len + 1 (unknown procedures), lazily */
    uint64_t dropped, delivered;
    uint64_t cache[VM_CACHE__COUNT];
    char last_error[256];   /* "" while reached */
};

struct mlis {               /* one listener, by name */
    char *name;             /* owned */
    struct vm_bytes bytes;
    uint64_t accepted;
    uint64_t auth_fail[VM_AUTHM__COUNT];
};

struct vm_metrics {
    struct mup **ups;       /* owned; entries never move (their bytes are pointed to) */
    int nups, capups;
    struct mlis **lis;      /* owned, likewise */
    int nlis, caplis;
    uint64_t limits[VM_LIMIT__COUNT];
    uint64_t errors[VM_ERRK__COUNT];
};

/* Label values, in enum order: named after the config key that sets the bound. */
static const char *const limit_names[VM_LIMIT__COUNT] = {
    [VM_LIMIT_MAX_CLIENTS] = "max_clients",
    [VM_LIMIT_MAX_UNAUTHENTICATED] = "max_unauthenticated",
    [VM_LIMIT_MAX_UNAUTHENTICATED_PER_SOURCE] = "max_unauthenticated_per_source",
    [VM_LIMIT_AUTH_TIMEOUT] = "auth_timeout",
    [VM_LIMIT_SASL_MAX_FAILURES] = "sasl_max_failures",
    [VM_LIMIT_RULE_MAX_SESSIONS] = "policy_max_sessions",
    [VM_LIMIT_MAX_CLIENT_REQUESTS] = "max_client_requests",
    [VM_LIMIT_OUTSTANDING_BYTES] = "outstanding_bytes",
    [VM_LIMIT_CLIENT_OUTPUT] = "client_output",
    [VM_LIMIT_STREAM_UPLOAD] = "stream_upload",
    [VM_LIMIT_MAX_INFLIGHT] = "max_inflight",
    [VM_LIMIT_QUEUE_TIMEOUT] = "queue_timeout",
    [VM_LIMIT_MAX_STREAMS] = "max_streams",
    [VM_LIMIT_STREAM_QUEUE_TIMEOUT] = "stream_queue_timeout",
    [VM_LIMIT_EVENTS_PER_SESSION] = "events_max_per_session",
    [VM_LIMIT_EVENT_QUEUE_BYTES] = "events_max_queue_bytes",
    [VM_LIMIT_EVENT_ARGS] = "event_args",
    [VM_LIMIT_INTERNAL_RESERVE] = "internal_reserve",
    [VM_LIMIT_FRAME_LENGTH] = "frame_length",
    [VM_LIMIT_NAME_LENGTH] = "name_length",
    [VM_LIMIT_RECONNECT_HOLD] = "reconnect_hold",
    [VM_LIMIT_MAX_UPSTREAMS] = "max_upstreams",
};

static const char *const error_names[VM_ERRK__COUNT] = {
    [VM_ERRK_UPSTREAM] = "upstream",
    [VM_ERRK_TIMEOUT] = "timeout",
    [VM_ERRK_DENIED] = "denied",
    [VM_ERRK_UNSUPPORTED] = "unsupported",
    [VM_ERRK_RPC] = "rpc",
    [VM_ERRK_NO_CONNECT] = "no_connect",
    [VM_ERRK_INTERNAL] = "internal",
    [VM_ERRK_AUTH] = "auth",
    [VM_ERRK_OTHER] = "other",
    [VM_ERRK_PROTOCOL] = "protocol",
    [VM_ERRK_LINK_DOWN] = "link_down",
};

static const char *const mech_names[VM_AUTHM__COUNT] = {
    [VM_AUTHM_TLS] = "tls",
    [VM_AUTHM_SCRAM_SHA_256] = "SCRAM-SHA-256",
    [VM_AUTHM_DIGEST_MD5] = "DIGEST-MD5",
    [VM_AUTHM_GSSAPI] = "GSSAPI",
    [VM_AUTHM_SASL_OTHER] = "sasl",
};

struct vm_metrics *metrics_new(void)
{
    return vm_calloc(1, sizeof(struct vm_metrics));
}

void metrics_free(struct vm_metrics *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->nups; i++) {
        for (size_t k = 0; m->ups[i]->hist && k <= vm_proc_table_len; k++)
            free(m->ups[i]->hist[k]);
        free(m->ups[i]->hist);
        free(m->ups[i]->name);
        free(m->ups[i]);
    }
    for (int i = 0; i < m->nlis; i++) {
        free(m->lis[i]->name);
        free(m->lis[i]);
    }
    free(m->ups);
    free(m->lis);
    free(m);
}

/* Grow an array of pointers by one slot. */
static void *grow(void *arr, int n, int *cap)
{
    if (n < *cap)
        return arr;
    *cap = *cap ? *cap * 2 : 8;
    void *p = realloc(arr, (size_t)*cap * sizeof(void *));
    if (!p)
        abort();
    return p;
}

int metrics_upstream(struct vm_metrics *m, const char *name)
{
    int spare = -1;
    for (int i = 0; i < m->nups; i++) {
        if (!m->ups[i]->name)
            spare = spare < 0 ? i : spare;
        else if (!strcmp(m->ups[i]->name, name))
            return i;
    }
    if (spare >= 0) { /* a forgotten slot, zeroed by metrics_upstream_forget */
        m->ups[spare]->name = vm_strdup(name);
        return spare;
    }
    m->ups = grow(m->ups, m->nups, &m->capups);
    struct mup *u = vm_calloc(1, sizeof(*u));
    u->name = vm_strdup(name);
    /* u->hist is made at the first call: an upstream nobody uses (a fleet lists many) costs
     * its name and counters, not a pointer per procedure. */
    m->ups[m->nups] = u;
    return m->nups++;
}

int metrics_listener(struct vm_metrics *m, const char *name)
{
    for (int i = 0; i < m->nlis; i++)
        if (!strcmp(m->lis[i]->name, name))
            return i;
    m->lis = grow(m->lis, m->nlis, &m->caplis);
    struct mlis *l = vm_calloc(1, sizeof(*l));
    l->name = vm_strdup(name);
    m->lis[m->nlis] = l;
    return m->nlis++;
}

void metrics_upstream_forget(struct vm_metrics *m, int up)
{
    if (up < 0 || up >= m->nups)
        return;
    struct mup *u = m->ups[up];
    for (size_t k = 0; u->hist && k <= vm_proc_table_len; k++)
        free(u->hist[k]);
    free(u->hist);
    free(u->name);
    memset(u, 0, sizeof(*u));
}

struct vm_bytes *metrics_upstream_bytes(struct vm_metrics *m, int up)
{
    return &m->ups[up]->bytes;
}

struct vm_bytes *metrics_listener_bytes(struct vm_metrics *m, int lis)
{
    return &m->lis[lis]->bytes;
}

uint64_t metrics_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void metrics_call(struct vm_metrics *m, int up, const struct vm_proc_info *info, uint64_t t0_ns)
{
    if (up < 0 || up >= m->nups)
        return;
    size_t k = info ? (size_t)(info - vm_proc_table) : vm_proc_table_len;
    if (!m->ups[up]->hist)
        m->ups[up]->hist = vm_calloc(vm_proc_table_len + 1, sizeof(*m->ups[up]->hist));
    struct hist **slot = &m->ups[up]->hist[k];
    if (!*slot)
        *slot = vm_calloc(1, sizeof(**slot));
    struct hist *h = *slot;
    uint64_t now = metrics_now_ns();
    uint64_t d = now > t0_ns ? now - t0_ns : 0;
    size_t b = 0;
    while (b < NBUCKETS && d > bucket_ns[b])
        b++;
    h->bucket[b]++;
    h->count++;
    h->sum_ns += d;
}

void metrics_limit(struct vm_metrics *m, enum vm_limit what)
{
    m->limits[what]++;
}

void metrics_error(struct vm_metrics *m, enum vm_error_kind kind)
{
    m->errors[kind]++;
}

void metrics_error_code(struct vm_metrics *m, int code)
{
    enum vm_error_kind k;
    switch (code) {
    case VIR_ERR_OPERATION_TIMEOUT:
        k = VM_ERRK_TIMEOUT;
        break;
    case VIR_ERR_ACCESS_DENIED:
    case VIR_ERR_OPERATION_DENIED:
        k = VM_ERRK_DENIED;
        break;
    case VIR_ERR_NO_SUPPORT:
        k = VM_ERRK_UNSUPPORTED;
        break;
    case VIR_ERR_RPC:
    case VIR_ERR_INVALID_ARG:
        k = VM_ERRK_RPC;
        break;
    case VIR_ERR_NO_CONNECT:
        k = VM_ERRK_NO_CONNECT;
        break;
    case VIR_ERR_INTERNAL_ERROR:
        k = VM_ERRK_INTERNAL;
        break;
    case VIR_ERR_AUTH_FAILED:
        k = VM_ERRK_AUTH;
        break;
    default:
        k = VM_ERRK_OTHER;
        break;
    }
    m->errors[k]++;
}

void metrics_auth_failure(struct vm_metrics *m, int lis, enum vm_auth_mech mech)
{
    if (lis >= 0 && lis < m->nlis)
        m->lis[lis]->auth_fail[mech]++;
}

enum vm_auth_mech metrics_sasl_mech(const char *name)
{
    if (!name)
        return VM_AUTHM_SASL_OTHER;
    if (!strcasecmp(name, "SCRAM-SHA-256"))
        return VM_AUTHM_SCRAM_SHA_256;
    if (!strcasecmp(name, "DIGEST-MD5"))
        return VM_AUTHM_DIGEST_MD5;
    if (!strcasecmp(name, "GSSAPI"))
        return VM_AUTHM_GSSAPI;
    return VM_AUTHM_SASL_OTHER;
}

void metrics_session_accepted(struct vm_metrics *m, int lis)
{
    if (lis >= 0 && lis < m->nlis)
        m->lis[lis]->accepted++;
}

void metrics_upstream_error(struct vm_metrics *m, int up, const char *message)
{
    if (up >= 0 && up < m->nups)
        snprintf(m->ups[up]->last_error, sizeof(m->ups[up]->last_error), "%s",
                 message ? message : "");
}

const char *metrics_upstream_last_error(const struct vm_metrics *m, int up)
{
    if (up < 0 || up >= m->nups || !m->ups[up]->last_error[0])
        return NULL;
    return m->ups[up]->last_error;
}

void metrics_subscriber_dropped(struct vm_metrics *m, int up)
{
    if (up >= 0 && up < m->nups)
        m->ups[up]->dropped++;
}

void metrics_events_delivered(struct vm_metrics *m, int up, unsigned n)
{
    if (up >= 0 && up < m->nups)
        m->ups[up]->delivered += n;
}

void metrics_cache(struct vm_metrics *m, int up, enum vm_cache_stat what)
{
    if (up >= 0 && up < m->nups)
        m->ups[up]->cache[what]++;
}

/* ---- the text format ---- */

/* A label value: backslash, double quote and line feed escaped. */
static void put_escaped(struct evbuffer *out, const char *v)
{
    const char *run = v;
    for (; *v; v++) {
        const char *esc = *v == '\\' ? "\\\\" : *v == '"' ? "\\\"" : *v == '\n' ? "\\n" : NULL;
        if (!esc)
            continue;
        evbuffer_add(out, run, (size_t)(v - run));
        evbuffer_add(out, esc, 2);
        run = v + 1;
    }
    evbuffer_add(out, run, (size_t)(v - run));
}

static void put_labels(struct evbuffer *out, const char *const *labels)
{
    if (!labels || !labels[0])
        return;
    evbuffer_add(out, "{", 1);
    for (int i = 0; labels[i]; i += 2) {
        evbuffer_add_printf(out, "%s%s=\"", i ? "," : "", labels[i]);
        put_escaped(out, labels[i + 1] ? labels[i + 1] : "");
        evbuffer_add(out, "\"", 1);
    }
    evbuffer_add(out, "}", 1);
}

void metrics_write_family(struct evbuffer *out, const char *name, const char *type,
                          const char *help)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metrics_write_sample(struct evbuffer *out, const char *name, const char *const *labels,
                          double value)
{
    evbuffer_add_printf(out, "%s", name);
    put_labels(out, labels);
    evbuffer_add_printf(out, " %.17g\n", value);
}

static void write_u64(struct evbuffer *out, const char *name, const char *const *labels,
                      uint64_t value)
{
    evbuffer_add_printf(out, "%s", name);
    put_labels(out, labels);
    evbuffer_add_printf(out, " %" PRIu64 "\n", value);
}

static void render_histograms(const struct vm_metrics *m, struct evbuffer *out)
{
    const char *name = "virtmux_call_duration_seconds";
    metrics_write_family(out, name, "histogram",
                         "Forwarded calls by upstream and procedure: time from the client's "
                         "call to its reply or error.");
    for (int i = 0; i < m->nups; i++) {
        const struct mup *u = m->ups[i];
        for (size_t k = 0; u->name && u->hist && k <= vm_proc_table_len; k++) {
            const struct hist *h = u->hist[k];
            if (!h)
                continue;
            const char *proc = k < vm_proc_table_len ? vm_proc_table[k].name : "unknown";
            uint64_t cum = 0;
            for (size_t b = 0; b <= NBUCKETS; b++) {
                cum += h->bucket[b];
                const char *labels[] = {"upstream", u->name, "procedure", proc, "le",
                                        b < NBUCKETS ? bucket_le[b] : "+Inf", NULL};
                write_u64(out, "virtmux_call_duration_seconds_bucket", labels, cum);
            }
            const char *labels[] = {"upstream", u->name, "procedure", proc, NULL};
            evbuffer_add_printf(out, "virtmux_call_duration_seconds_sum");
            put_labels(out, labels);
            evbuffer_add_printf(out, " %" PRIu64 ".%09" PRIu64 "\n", h->sum_ns / 1000000000u,
                                h->sum_ns % 1000000000u);
            write_u64(out, "virtmux_call_duration_seconds_count", labels, h->count);
        }
    }
}

void metrics_render(const struct vm_metrics *m, struct evbuffer *out)
{
    render_histograms(m, out);

    metrics_write_family(out, "virtmux_errors_total", "counter",
                         "Errors by kind: error replies to clients (the gateway's own by "
                         "libvirt error class, libvirtd's as upstream), clients closed for "
                         "breaking the protocol, upstream connections failed or lost.");
    for (int k = 0; k < VM_ERRK__COUNT; k++) {
        const char *labels[] = {"kind", error_names[k], NULL};
        write_u64(out, "virtmux_errors_total", labels, m->errors[k]);
    }

    metrics_write_family(out, "virtmux_limit_hits_total", "counter",
                         "Times a bound refused or held something back, by limit.");
    for (int k = 0; k < VM_LIMIT__COUNT; k++) {
        const char *labels[] = {"limit", limit_names[k], NULL};
        write_u64(out, "virtmux_limit_hits_total", labels, m->limits[k]);
    }

    metrics_write_family(out, "virtmux_auth_failures_total", "counter",
                         "Failed client authentications by listener and mechanism.");
    for (int i = 0; i < m->nlis; i++)
        for (int k = 0; k < VM_AUTHM__COUNT; k++) {
            const char *labels[] = {"listener", m->lis[i]->name, "mechanism", mech_names[k],
                                    NULL};
            write_u64(out, "virtmux_auth_failures_total", labels, m->lis[i]->auth_fail[k]);
        }

    metrics_write_family(out, "virtmux_sessions_accepted_total", "counter",
                         "Client connections accepted, by listener.");
    for (int i = 0; i < m->nlis; i++) {
        const char *labels[] = {"listener", m->lis[i]->name, NULL};
        write_u64(out, "virtmux_sessions_accepted_total", labels, m->lis[i]->accepted);
    }

    static const struct {
        const char *name, *help;
        int upstream, out;
    } bytes[] = {
        {"virtmux_client_received_bytes_total", "Bytes of libvirt packets read from clients.",
         0, 0},
        {"virtmux_client_sent_bytes_total", "Bytes of libvirt packets queued to clients.", 0, 1},
        {"virtmux_upstream_received_bytes_total", "Bytes of libvirt packets read from libvirtd.",
         1, 0},
        {"virtmux_upstream_sent_bytes_total", "Bytes of libvirt packets queued to libvirtd.", 1,
         1},
    };
    for (size_t f = 0; f < sizeof(bytes) / sizeof(bytes[0]); f++) {
        metrics_write_family(out, bytes[f].name, "counter", bytes[f].help);
        int n = bytes[f].upstream ? m->nups : m->nlis;
        for (int i = 0; i < n; i++) {
            if (bytes[f].upstream && !m->ups[i]->name)
                continue; /* forgotten */
            const struct vm_bytes *b = bytes[f].upstream ? &m->ups[i]->bytes : &m->lis[i]->bytes;
            const char *labels[] = {bytes[f].upstream ? "upstream" : "listener",
                                    bytes[f].upstream ? m->ups[i]->name : m->lis[i]->name, NULL};
            write_u64(out, bytes[f].name, labels, bytes[f].out ? b->out : b->in);
        }
    }

    metrics_write_family(out, "virtmux_event_subscribers_dropped_total", "counter",
                         "Event subscribers cut off for not reading (events.max_queue_bytes).");
    for (int i = 0; i < m->nups; i++) {
        const char *labels[] = {"upstream", m->ups[i]->name, NULL};
        if (m->ups[i]->name)
            write_u64(out, "virtmux_event_subscribers_dropped_total", labels, m->ups[i]->dropped);
    }
    metrics_write_family(out, "virtmux_events_delivered_total", "counter",
                         "Event messages delivered to subscribers (one per subscriber).");
    for (int i = 0; i < m->nups; i++) {
        const char *labels[] = {"upstream", m->ups[i]->name, NULL};
        if (m->ups[i]->name)
            write_u64(out, "virtmux_events_delivered_total", labels, m->ups[i]->delivered);
    }

    static const struct {
        const char *name, *help;
        enum vm_cache_stat stat;
    } cache[] = {
        {"virtmux_cache_hits_total", "Calls answered from the micro-cache.", VM_CACHE_HIT},
        {"virtmux_cache_misses_total", "Cacheable calls not answered from the micro-cache.",
         VM_CACHE_MISS},
        {"virtmux_coalesced_calls_total",
         "Calls that shared an identical read-only call already in flight.",
         VM_CACHE_COALESCED},
    };
    for (size_t f = 0; f < sizeof(cache) / sizeof(cache[0]); f++) {
        metrics_write_family(out, cache[f].name, "counter", cache[f].help);
        for (int i = 0; i < m->nups; i++) {
            const char *labels[] = {"upstream", m->ups[i]->name, NULL};
            if (m->ups[i]->name) /* not forgotten */
                write_u64(out, cache[f].name, labels, m->ups[i]->cache[cache[f].stat]);
        }
    }
    static const struct {
        const char *reason;
        enum vm_cache_stat stat;
    } inval[] = {
        {"write", VM_CACHE_INVALIDATED_WRITE},
        {"event", VM_CACHE_INVALIDATED_EVENT},
        {"link", VM_CACHE_INVALIDATED_LINK},
    };
    metrics_write_family(out, "virtmux_cache_invalidations_total", "counter",
                         "Micro-cache invalidations, by cause (a write call through the "
                         "gateway, a lifecycle event, a lost link).");
    for (int i = 0; i < m->nups; i++)
        for (size_t r = 0; m->ups[i]->name && r < sizeof(inval) / sizeof(inval[0]); r++) {
            const char *labels[] = {"upstream", m->ups[i]->name, "reason", inval[r].reason,
                                    NULL};
            write_u64(out, "virtmux_cache_invalidations_total", labels,
                      m->ups[i]->cache[inval[r].stat]);
        }
}
