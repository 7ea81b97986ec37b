#include "proc.h"

#include <stdio.h>

/* The generated table is sorted by (program, number); search it. */
const struct vm_proc_info *vm_proc_lookup(uint32_t prog, int32_t proc)
{
    size_t lo = 0, hi = vm_proc_table_len;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const struct vm_proc_info *p = &vm_proc_table[mid];
        if (p->prog == prog && p->proc == proc)
            return p;
        if (p->prog < prog || (p->prog == prog && p->proc < proc))
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const char *vm_proc_name(uint32_t prog, int32_t proc, char *buf, size_t len)
{
    const struct vm_proc_info *p = vm_proc_lookup(prog, proc);
    if (p)
        return p->name;
    const char *family = prog == VM_PROG_QEMU      ? "QEMU"
                         : prog == VM_PROG_LXC       ? "LXC"
                         : prog == VM_PROG_KEEPALIVE ? "KEEPALIVE"
                         : prog == VM_PROG_REMOTE    ? "REMOTE"
                                                     : "UNKNOWN";
    snprintf(buf, len, "%s_PROC_%d", family, (int)proc);
    return buf;
}
