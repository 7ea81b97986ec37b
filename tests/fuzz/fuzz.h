/* The libFuzzer entry points every harness defines. Under -Dfuzz=true libFuzzer calls them;
 * otherwise replay.c does, over the checked-in corpus. */
#ifndef VM_FUZZ_H
#define VM_FUZZ_H

#include <stddef.h>
#include <stdint.h>

/* One input; must not keep state that changes the next input's outcome. Returns 0. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Once per process, before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv);

#endif
