/* The generated procedure table: complete, sorted, and classified the way the gateway needs. */
#include "check.h"
#include "proc.h"

int main(void)
{
    CHECK(vm_proc_table_len == 453);
    int counts[8] = {0};
    for (size_t i = 0; i < vm_proc_table_len; i++) {
        const struct vm_proc_info *p = &vm_proc_table[i];
        CHECK(p->kind >= VM_PK_CALL && p->kind <= VM_PK_KEEPALIVE);
        CHECK(p->ro == VM_RO_YES || p->ro == VM_RO_NO || p->ro == VM_RO_FLAGS);
        counts[p->kind]++;
        CHECK(vm_proc_lookup(p->prog, p->proc) == p);
        if (i) {
            const struct vm_proc_info *q = &vm_proc_table[i - 1];
            CHECK(q->prog < p->prog || (q->prog == p->prog && q->proc < p->proc));
        }
    }
    CHECK(counts[VM_PK_STREAM_CREATE] == 8);
    CHECK(counts[VM_PK_EVENT_REGISTER] == 8);
    CHECK(counts[VM_PK_AUTH] == 5);
    CHECK(counts[VM_PK_CONNECTION] == 7);

    const struct vm_proc_info *p = vm_proc_lookup(VM_PROG_REMOTE, 16);
    CHECK(p && strcmp(p->name, "DOMAIN_GET_INFO") == 0 && p->kind == VM_PK_CALL);
    p = vm_proc_lookup(VM_PROG_REMOTE, 211);
    CHECK(p && p->kind == VM_PK_STREAM_CREATE);
    p = vm_proc_lookup(VM_PROG_REMOTE, 316);
    CHECK(p && p->kind == VM_PK_EVENT_REGISTER);
    p = vm_proc_lookup(VM_PROG_REMOTE, 309);
    CHECK(p && p->fds_in && !p->fds_out);
    p = vm_proc_lookup(VM_PROG_LXC, 1);
    CHECK(p && p->fds_out);
    p = vm_proc_lookup(VM_PROG_QEMU, 4);
    CHECK(p && p->kind == VM_PK_EVENT_REGISTER);
    CHECK(vm_proc_lookup(VM_PROG_KEEPALIVE, 1) != NULL);
    CHECK(vm_proc_lookup(VM_PROG_REMOTE, 100000) == NULL);
    CHECK(vm_proc_lookup(VM_PROG_REMOTE, -1) == NULL);
    CHECK(vm_proc_lookup(0x12345678, 1) == NULL);
    return check_done();
}
