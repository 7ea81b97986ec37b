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

    /* Generated names and event families: every callback event names the register
     * procedure its ids come from, and register/deregister procedures pair up. */
    CHECK(VM_PROC_DOMAIN_GET_INFO == 16 && VM_PROC_AUTH_SASL_STEP == 69);
    CHECK(VM_QEMU_PROC_CONNECT_DOMAIN_MONITOR_EVENT_DEREGISTER == 5);
    CHECK(VM_PROC_KEEPALIVE_PONG == 2);
    for (size_t i = 0; i < vm_proc_table_len; i++) {
        const struct vm_proc_info *e = &vm_proc_table[i];
        if (e->kind == VM_PK_EVENT && e->cb_first) {
            const struct vm_proc_info *r = vm_proc_lookup(e->prog, e->family);
            CHECK(r && r->kind == VM_PK_EVENT_REGISTER && !r->legacy);
        }
        if ((e->kind == VM_PK_EVENT_REGISTER || e->kind == VM_PK_EVENT_DEREGISTER) &&
            !e->legacy) {
            const struct vm_proc_info *q = vm_proc_lookup(e->prog, e->pair);
            CHECK(q && q->pair == e->proc && q->kind != e->kind);
        }
    }
    p = vm_proc_lookup(VM_PROG_REMOTE, VM_PROC_NETWORK_EVENT_LIFECYCLE);
    CHECK(p && p->family == VM_PROC_CONNECT_NETWORK_EVENT_REGISTER_ANY);
    p = vm_proc_lookup(VM_PROG_REMOTE, VM_PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE);
    CHECK(p && p->family == VM_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY);
    return check_done();
}
