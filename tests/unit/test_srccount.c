/* Per-source counters: the cap per source, independence of sources, entries gone at zero. */
#include <stdio.h>

#include "check.h"
#include "srccount.h"

int main(void)
{
    struct vm_srccount *t = srccount_new();
    CHECK(srccount_acquire(t, "10.0.0.1", 2) == 0);
    CHECK(srccount_acquire(t, "10.0.0.1", 2) == 0);
    CHECK(srccount_acquire(t, "10.0.0.1", 2) == -1); /* full */
    CHECK(srccount_get(t, "10.0.0.1") == 2);         /* a refusal counts nothing */
    CHECK(srccount_acquire(t, "uid=1000", 2) == 0);  /* another source is not affected */
    CHECK(srccount_sources(t) == 2);
    srccount_release(t, "10.0.0.1");
    CHECK(srccount_acquire(t, "10.0.0.1", 2) == 0); /* room again */
    srccount_release(t, "10.0.0.1");
    srccount_release(t, "10.0.0.1");
    CHECK(srccount_get(t, "10.0.0.1") == 0);
    CHECK(srccount_sources(t) == 1); /* the entry went at zero */
    srccount_release(t, "10.0.0.9"); /* unknown: ignored */
    CHECK(srccount_sources(t) == 1);

    /* Many sources come and go: the table empties, whatever it held at its peak. */
    char name[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(name, sizeof(name), "192.0.2.%d", i);
        CHECK(srccount_acquire(t, name, 1) == 0);
    }
    CHECK(srccount_sources(t) == 1001);
    for (int i = 0; i < 1000; i++) {
        snprintf(name, sizeof(name), "192.0.2.%d", i);
        srccount_release(t, name);
    }
    CHECK(srccount_sources(t) == 1);
    CHECK(srccount_get(t, "uid=1000") == 1); /* survived the moves */
    srccount_release(t, "uid=1000");
    CHECK(srccount_sources(t) == 0);
    srccount_free(t);
    return check_done();
}
