/* Who a client is, fixed when the session is accepted (and, with the auth issue, completed by
 * authentication). Immutable afterwards; policy rules and audit lines are written against it. */
#ifndef VM_IDENTITY_H
#define VM_IDENTITY_H

#include <sys/socket.h>
#include <sys/types.h>

struct vm_identity {
    const char *listener;           /* listener name (config snapshot) */
    int is_unix;
    struct sockaddr_storage addr;   /* TCP peer; family AF_UNSPEC for unix */
    char source[64];                /* printable TCP peer address without port, or "" */
    int has_cred;                   /* unix peer credentials (SO_PEERCRED) */
    uid_t uid;
    gid_t gid;
    pid_t pid;
    const char *sasl_user;          /* NULL until SASL exists */
    const char *tls_dn;             /* NULL until TLS exists */
};

/* A short printable form for logs and audit keys: "uid=0@local", "127.0.0.1@tcp". */
const char *identity_str(const struct vm_identity *id, char *buf, size_t len);
/* Who per-source limits (SASL failures, unauthenticated sockets) count against: the TCP peer
 * address, "uid=N" for a unix client, "unix" when its credentials are unknown. One local user
 * must not spend another's allowance, and every local user shares the address "unix". */
const char *identity_source(const struct vm_identity *id, char *buf, size_t len);

#endif
