#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static enum vm_log_level log_level = VM_LOG_INFO;
static int log_json;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void vm_log_setup(enum vm_log_level level, int json)
{
    log_level = level;
    log_json = json;
}

int vm_log_enabled(enum vm_log_level level)
{
    return level <= log_level;
}

int vm_log_level_parse(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

/* Write `s` as the body of a JSON string. */
static void json_escape(FILE *f, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
}

void vm_log(enum vm_log_level level, const char *obj, const char *fmt, ...)
{
    if (!vm_log_enabled(level))
        return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char ts[32];
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);

    if (log_json) {
        fprintf(stderr, "{\"ts\":\"%s.%03dZ\",\"level\":\"%s\",\"obj\":\"", ts,
                (int)(tv.tv_usec / 1000), level_names[level]);
        json_escape(stderr, obj ? obj : "virtmux");
        fputs("\",\"msg\":\"", stderr);
        json_escape(stderr, msg);
        fputs("\"}\n", stderr);
    } else {
        fprintf(stderr, "%s.%03dZ %-5s %s: %s\n", ts, (int)(tv.tv_usec / 1000),
                level_names[level], obj ? obj : "virtmux", msg);
    }
    fflush(stderr);
}
