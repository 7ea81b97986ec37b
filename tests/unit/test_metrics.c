/* metrics.c: label escaping, cumulative buckets, slots by name. */
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "check.h"
#include "metrics.h"
#include "proc.h"

static char *text_of(struct evbuffer *b)
{
    size_t n = evbuffer_get_length(b);
    char *s = malloc(n + 1);
    evbuffer_remove(b, s, n);
    s[n] = '\0';
    return s;
}

static void test_escaping(void)
{
    struct evbuffer *b = evbuffer_new();
    const char *labels[] = {"a", "x\"y\\z\nw", "b", "", NULL};
    metrics_write_sample(b, "virtmux_t", labels, 3);
    metrics_write_sample(b, "virtmux_u", NULL, 0.5);
    char *s = text_of(b);
    CHECK_STR(s, "virtmux_t{a=\"x\\\"y\\\\z\\nw\",b=\"\"} 3\nvirtmux_u 0.5\n");
    free(s);
    evbuffer_free(b);
}

static uint64_t ago(uint64_t ns)
{
    return metrics_now_ns() - ns;
}

static void test_histogram(void)
{
    struct vm_metrics *m = metrics_new();
    int up = metrics_upstream(m, "hv1");
    CHECK(metrics_upstream(m, "hv2") == up + 1);
    CHECK(metrics_upstream(m, "hv1") == up); /* by name, once */
    const struct vm_proc_info *info = vm_proc_lookup(VM_PROG_REMOTE, VM_PROC_DOMAIN_GET_INFO);
    metrics_call(m, up, info, ago(100000));      /* 0.1 ms: first bucket */
    metrics_call(m, up, info, ago(3000000));     /* 3 ms: le 0.005 */
    metrics_call(m, up, NULL, ago(0));           /* unknown procedure */
    metrics_call(m, up, info, ago(20000000000)); /* 20 s: +Inf only */
    struct evbuffer *b = evbuffer_new();
    metrics_render(m, b);
    char *s = text_of(b);
    CHECK(strstr(s, "procedure=\"DOMAIN_GET_INFO\",le=\"0.0005\"} 1\n") != NULL);
    CHECK(strstr(s, "procedure=\"DOMAIN_GET_INFO\",le=\"0.0025\"} 1\n") != NULL);
    CHECK(strstr(s, "procedure=\"DOMAIN_GET_INFO\",le=\"0.005\"} 2\n") != NULL);
    CHECK(strstr(s, "procedure=\"DOMAIN_GET_INFO\",le=\"10\"} 2\n") != NULL);
    CHECK(strstr(s, "procedure=\"DOMAIN_GET_INFO\",le=\"+Inf\"} 3\n") != NULL);
    CHECK(strstr(s, "virtmux_call_duration_seconds_count{upstream=\"hv1\","
                    "procedure=\"DOMAIN_GET_INFO\"} 3\n") != NULL);
    CHECK(strstr(s, "procedure=\"unknown\",le=\"+Inf\"} 1\n") != NULL);
    CHECK(strstr(s, "upstream=\"hv2\",procedure") == NULL); /* no call, no histogram */
    free(s);
    evbuffer_free(b);
    metrics_free(m);
}

static void test_counters(void)
{
    struct vm_metrics *m = metrics_new();
    int lis = metrics_listener(m, "tcp");
    metrics_limit(m, VM_LIMIT_QUEUE_TIMEOUT);
    metrics_limit(m, VM_LIMIT_QUEUE_TIMEOUT);
    metrics_error_code(m, 68); /* VIR_ERR_OPERATION_TIMEOUT */
    metrics_auth_failure(m, lis, metrics_sasl_mech("scram-sha-256"));
    metrics_auth_failure(m, lis, metrics_sasl_mech("evil\"mech"));
    metrics_listener_bytes(m, lis)->in += 28;
    struct evbuffer *b = evbuffer_new();
    metrics_render(m, b);
    char *s = text_of(b);
    CHECK(strstr(s, "virtmux_limit_hits_total{limit=\"queue_timeout\"} 2\n") != NULL);
    CHECK(strstr(s, "virtmux_errors_total{kind=\"timeout\"} 1\n") != NULL);
    CHECK(strstr(s, "{listener=\"tcp\",mechanism=\"SCRAM-SHA-256\"} 1\n") != NULL);
    CHECK(strstr(s, "{listener=\"tcp\",mechanism=\"sasl\"} 1\n") != NULL); /* no free text */
    CHECK(strstr(s, "virtmux_client_received_bytes_total{listener=\"tcp\"} 28\n") != NULL);
    free(s);
    evbuffer_free(b);
    metrics_free(m);
}

/* A forgotten upstream slot leaves the output and is reused, zeroed, by the next new name. */
static void test_forget(void)
{
    struct vm_metrics *m = metrics_new();
    int a = metrics_upstream(m, "hv-a");
    int b = metrics_upstream(m, "hv-b");
    const struct vm_proc_info *info = vm_proc_lookup(VM_PROG_REMOTE, VM_PROC_DOMAIN_GET_INFO);
    metrics_call(m, a, info, ago(1000));
    metrics_upstream_bytes(m, a)->in += 99;
    metrics_upstream_error(m, a, "gone");
    metrics_upstream_forget(m, a);
    struct evbuffer *buf = evbuffer_new();
    metrics_render(m, buf);
    char *s = text_of(buf);
    CHECK(strstr(s, "hv-a") == NULL);
    CHECK(strstr(s, "(null)") == NULL && strstr(s, "{upstream=}") == NULL);
    CHECK(strstr(s, "virtmux_upstream_received_bytes_total{upstream=\"hv-b\"} 0\n") != NULL);
    free(s);
    CHECK(metrics_upstream(m, "hv-c") == a); /* the slot again, counters zero */
    CHECK(metrics_upstream(m, "hv-b") == b);
    CHECK(metrics_upstream_bytes(m, a)->in == 0 && !metrics_upstream_last_error(m, a));
    evbuffer_drain(buf, evbuffer_get_length(buf));
    metrics_render(m, buf);
    s = text_of(buf);
    CHECK(strstr(s, "virtmux_upstream_received_bytes_total{upstream=\"hv-c\"} 0\n") != NULL);
    CHECK(strstr(s, "upstream=\"hv-c\",procedure") == NULL);
    free(s);
    evbuffer_free(buf);
    metrics_free(m);
}

int main(void)
{
    test_forget();
    test_escaping();
    test_histogram();
    test_counters();
    return check_done();
}
