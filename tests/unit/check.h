/* A minimal check harness for the unit tests: CHECK(cond) records a failure and goes on;
 * check_done() prints "N passed, N failed" and returns the exit status. */
#ifndef VM_CHECK_H
#define VM_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_pass, check_fail;

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (cond) {                                                              \
            check_pass++;                                                        \
        } else {                                                                 \
            check_fail++;                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                        \
    } while (0)

#define CHECK_STR(a, b)                                                          \
    do {                                                                         \
        const char *a_ = (a), *b_ = (b);                                         \
        if (a_ && b_ && strcmp(a_, b_) == 0) {                                   \
            check_pass++;                                                        \
        } else {                                                                 \
            check_fail++;                                                        \
            fprintf(stderr, "%s:%d: \"%s\" != \"%s\"\n", __FILE__, __LINE__,     \
                    a_ ? a_ : "(null)", b_ ? b_ : "(null)");                     \
        }                                                                        \
    } while (0)

static inline int check_done(void)
{
    printf("%d passed, %d failed\n", check_pass, check_fail);
    return check_fail ? 1 : 0;
}

/* Parse a hex string (spaces ignored) into buf; returns the byte count. */
static inline size_t hex_bytes(const char *hex, unsigned char *buf, size_t cap)
{
    size_t n = 0;
    int hi = -1;
    for (; *hex; hex++) {
        int v;
        if (*hex >= '0' && *hex <= '9') v = *hex - '0';
        else if (*hex >= 'a' && *hex <= 'f') v = *hex - 'a' + 10;
        else continue;
        if (hi < 0) {
            hi = v;
        } else {
            if (n < cap) buf[n] = (unsigned char)(hi << 4 | v);
            n++;
            hi = -1;
        }
    }
    return n;
}

#endif
