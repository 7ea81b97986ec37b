/* Configuration: a JSON file read with jansson into an immutable snapshot.
 *
 * Keys (type, default). SIGHUP reloads every key (gateway_reload) except those marked
 * [restart], which keep their running value (a change is logged as a warning):
 *   listeners[]            array, required, at least one
 *     .name                string, "listenerN"
 *     .address             "host:port" TCP listener            } exactly one of
 *     .unix                path of a unix socket listener      } address / unix
 *     .mode                octal string for the unix socket, "0660"
 *     .auth                "none" | "sasl" | "tls" | "tls+sasl" | "peer", "none"
 *     .tls                 {cert, key, ca, crl, verify_client: "required"|"optional"|"none",
 *                           allowed_dn: [globs]}: makes it a TLS listener
 *     .upstream            upstream used when the name names none, optional
 *     .proxy_protocol      bool, false: TCP and TLS listeners only. Every connection must
 *                          start with a PROXY protocol v2 header (HAProxy send-proxy-v2),
 *                          read before TLS within limits.auth_timeout_s; the client address
 *                          it names is the peer for policy, limits, logs and /status.
 *                          Connections without a valid header are closed.
 *   upstreams[]            array, required, at least one
 *     .name                string, required, unique, [A-Za-z0-9_.-]
 *     .uri                 DRIVER+tcp://host[:port]/PATH | DRIVER+unix:///PATH?socket=S
 *     .pool.max_connections   int 1..256, 4
 *     .pool.max_inflight      int 1..1024, 4 (one below libvirtd's max_client_requests)
 *     .pool.idle_timeout_s    int 0..86400, 60
 *     .pool.connect_timeout_ms int 100..600000, 10000
 *     .pool.give_up_s      int 0..86400, 60: after this long without reconnecting, sessions
 *                          homed on a lost connection move to a READY one of their pool, or
 *                          else are told (close callback) and closed; 0 = keep retrying forever
 *     .pool.max_streams    int 1..1024, 8: streams (each on its own upstream connection) open
 *                          at once; more wait up to limits.queue_timeout_ms, then fail
 *     .pool.reconnect_hold_ms int 0..3600000, 10000: while the pool reconnects (libvirtd
 *                          restarted) or its upstream is paused, new calls wait this long
 *                          (and at most limits.queue_timeout_ms) instead of failing at once;
 *                          0 = fail at once (pause then holds up to queue_timeout_ms)
 *     .pool.coalesce       bool, true: identical calls of read-only verdict "yes" (same
 *                          program, procedure and argument bytes) in flight on the pool at
 *                          the same time share one upstream call; each caller gets the reply
 *                          (or the error) under its own serial (src/cache.h)
 *     .cache               object, absent = off: the micro-cache of the upstream's pools
 *       .ttl_ms            int 1..3600000, 1000: how long a reply is served from the cache
 *       .procedures        [names], required, non-empty: procedure names of the table
 *                          ("CONNECT_LIST_ALL_DOMAINS"); each must have read-only verdict
 *                          "yes" and be a plain call (no stream, event or FD procedure)
 *       .readwrite         bool, false: read-write sessions get cached replies too (they
 *                          always coalesce); false = only read-only sessions' pools cache
 *       .max_entries       int 1..1000000, 1024: entries per pool; the oldest go first
 *       .max_bytes         int 4096..1073741824, 16777216: reply bytes per pool
 *                          Entries are dropped on any lifecycle event of the pool (the
 *                          gateway's own registration) and on any call of verdict other than
 *                          "yes" through the gateway to the upstream.
 *   upstream_templates[]   array, optional (then "upstreams" may be empty): upstreams made on
 *                          first use. Each takes every key of upstreams[] except "name":
 *     .match               glob over upstream names ("hv-*", "10.0.0.*"), required; the first
 *                          template that matches a client's first path segment is used, and
 *                          only when no named upstream has that name
 *     .uri                 as upstreams[].uri, with every "{name}" replaced by the name
 *                          ("qemu+tls://{name}.dc.example/system"); required to contain {name}
 *                          A name is checked before anything is made or connected: hostname
 *                          characters [A-Za-z0-9.-], no leading '-' or '.', no empty label,
 *                          at most 63 per label and 253 in all. An upstream made from a template
 *                          lives while it has a pool: once its pools go idle (pool.idle_timeout_s
 *                          with no sessions) it is freed and leaves /status and /metrics.
 *   limits.max_upstreams   int 1..1000000, 1024: upstreams made from templates existing at once;
 *                          one more is refused at CONNECT_OPEN with an error saying so
 *   default_upstream       name, optional
 *   routing.strict         bool, false: a CONNECT_OPEN name whose first path segment is not
 *                          an upstream ("qemu:///nosuch/system", but also "qemu:///system") is
 *                          refused with a message naming the upstreams, instead of going to
 *                          default_upstream. Names without a path ("") still take the default;
 *                          listeners with their own "upstream" are not affected.
 *   limits.max_clients     int, 10000
 *   limits.queue_timeout_ms int, 30000
 *   limits.max_unauthenticated int, 20: clients still authenticating at once (like libvirtd's
 *                          max_anonymous_clients); more are closed on accept
 *   limits.max_unauthenticated_per_source int, 5 (or max_unauthenticated if lower), at most
 *                          max_unauthenticated: the same per source (TCP address, unix uid),
 *                          so one source cannot take every slot
 *   limits.auth_timeout_s  int, 30: a client that has not authenticated by then is closed
 *   limits.drain_timeout_s int 0..3600, 30: on SIGTERM/SIGINT, how long calls in flight and
 *                          queued may take to finish before the rest are cut off
 *   limits.max_client_requests int 1..4096, 16: calls one client may have outstanding before
 *                          the gateway stops reading its socket
 *   keepalive.interval_s   int, 5 (-1 disables the gateway's own PINGs)
 *   keepalive.count        int, 5
 *   log.level              "error" | "warn" | "info" | "debug", "info"
 *   log.format             "text" | "json", "text"
 *   events.max_per_session int 1..65536, 256: event registrations one session may hold
 *   events.max_queue_bytes int, 8388608: a subscriber whose unsent output would pass this is
 *                          cut off (closed), so it cannot hold the others back
 *   Secret files (TLS keys, sasl.sasldb, sasl.keytab, upstreams[].sasl.password_file) with
 *   mode & 0006 are refused: other users must not read or write them.
 *   sasl.*                 [restart] once a SASL listener has been set up
 *   sasl.sasldb            path of the sasldb (never /etc unless you say so)
 *   sasl.mechanisms        ["scram-sha-256", "digest-md5", "gssapi"], default scram-sha-256 and
 *                          gssapi: digest-md5 leaks in cyrus-sasl, offered only when listed
 *   sasl.allowed_users     [globs], any
 *   sasl.keytab            GSSAPI keytab path, optional
 *   sasl.service_host      host part of the GSSAPI principal libvirt/HOST, the machine's name
 *   sasl.max_failures / sasl.failure_window_s   5 / 60: failed attempts per source (TCP
 *                          address; the uid for unix clients)
 *   upstreams[].tls        {cert, key, ca, crl, no_verify, server_name} for DRIVER+tls:// URIs
 *   upstreams[].sasl       {username, password_file}: when libvirtd asks for SASL
 *   admin.address          [restart] "host:port" of the HTTP admin endpoint (GET /status, /metrics,
 *                          /healthz, POST /sessions/ID/disconnect), optional
 *   admin.unix             [restart] or a unix socket path for it
 *   admin.token_file       [restart] file whose first line is a bearer token (16..1000 printable
 *                          characters), read at start; then every admin request needs
 *                          "Authorization: Bearer TOKEN". Refused if its group or other users
 *                          may read or write it (mode & 0066)
 *   process.user           [restart] user name to run as once listeners are bound and keys read
 *                          (needs root at start), optional; the sasldb, keytab and upstream
 *                          password files must be readable by it
 *   process.group          [restart] group name, optional: the user's primary group
 *   listeners[].readonly   bool, false: force read-only for every client of this listener
 *   policy                 optional; absent = every client may reach every upstream read-write
 *   policy.default         "deny" (the default) | "allow" | {grant}: when no rule matches
 *   policy.rules[]         first match wins; each {"match": {...}, grant...}
 *     .match.listener      glob on the listener name
 *     .match.source        CIDR of the TCP peer ("10.0.0.0/8", "::1/128")
 *     .match.unix_uid / .match.unix_gid   peer credentials of a unix client
 *     .match.sasl_user / .match.tls_dn    globs (identities from the auth issue)
 *     .deny                bool, false
 *     .readonly            bool, false
 *     .upstreams           ["hv1", "hv-*", ...] or "*", "*": names or globs (fnmatch); a
 *                          plain name must be an upstream or match a template
 *     .max_sessions        int, unlimited: open sessions under this rule at once
 *     .domains             ["web-*", "!web-secret"], all: the domains the session may see and
 *                          touch (globs; a name is granted when it matches a pattern and no
 *                          "!" pattern); see src/grant.h
 *     .networks / .storage_pools   the same for networks and storage pools (and volumes)
 */
#ifndef VM_CONFIG_H
#define VM_CONFIG_H

#include <stdio.h>

#include "fwd.h"
#include "uri.h"

/* What a listener requires before anything is forwarded. */
enum vm_auth {
    VM_AUTH_NONE,     /* nothing (TLS encryption may still be on) */
    VM_AUTH_SASL,     /* SASL (with a security layer on plain TCP) */
    VM_AUTH_TLS,      /* a verified client certificate is the authentication */
    VM_AUTH_TLS_SASL, /* both */
    VM_AUTH_PEER,     /* unix peer credentials are the identity */
};

enum { VM_TLS_VERIFY_NONE, VM_TLS_VERIFY_OPTIONAL, VM_TLS_VERIFY_REQUIRED };

/* TLS files and checks, for a listener (server) or an upstream (client). */
struct vm_tls_cfg {
    char *cert, *key, *ca, *crl;
    int verify_client;      /* listeners: VM_TLS_VERIFY_* */
    char **allowed_dn;      /* listeners: globs on the client DN (libvirt order); NULL = any */
    int no_verify;          /* upstreams: do not verify libvirtd's certificate */
    char *server_name;      /* upstreams: name to check in libvirtd's certificate */
};

struct vm_sasl_cfg {
    char *sasldb;           /* sasldb file (saslpasswd2 -f FILE -a libvirt USER) */
    char *mechanisms;       /* space separated, e.g. "scram-sha-256 digest-md5" */
    char **allowed_users;   /* globs; NULL = any user that authenticates */
    char *keytab;           /* GSSAPI keytab, optional */
    char *service_host;     /* HOST of the service principal libvirt/HOST; NULL = hostname */
    int max_failures;       /* per source address within failure_window_s */
    int failure_window_s;
};

/* A policy rule: what to match on, and what it grants. */
struct vm_rule {
    int index;              /* position in policy.rules, -1 for the default */
    char *listener;         /* globs; NULL = any */
    char *sasl_user;
    char *tls_dn;
    long uid, gid;          /* -1 = any */
    int has_cidr;
    int family;             /* AF_INET / AF_INET6 */
    unsigned char net[16];
    int prefix;
    int deny;
    int readonly;
    char **upstreams;       /* NULL-terminated; NULL = all upstreams */
    int max_sessions;       /* 0 = unlimited */
    char **domains;         /* NULL-terminated globs, "!glob" excludes; NULL = all domains */
    char **networks;        /* the same for networks */
    char **storage_pools;   /* and for storage pools (and their volumes) */
};

struct vm_listener_cfg {
    char *name;
    char *address;   /* "host:port" or NULL */
    char *unix_path; /* or NULL */
    unsigned mode;
    enum vm_auth auth;
    struct vm_tls_cfg *tls; /* a TLS listener when set */
    char *upstream;  /* NULL: use default_upstream */
    int readonly;    /* every client of this listener is read-only */
    int proxy_protocol; /* TCP/TLS: each connection starts with a PROXY v2 header */
};

struct vm_pool_cfg {
    int max_connections;
    int max_inflight;
    int idle_timeout_s;
    int connect_timeout_ms;
    int give_up_s;
    int max_streams;
    int reconnect_hold_ms;
    int coalesce;           /* share identical read-only calls in flight (src/cache.h) */
};

struct vm_proc_info;
/* upstreams[].cache (and a template's): the micro-cache; `enabled` 0 = no cache. */
struct vm_cache_cfg {
    int enabled;
    int ttl_ms;
    int readwrite;          /* read-write sessions' pools cache too */
    int max_entries;        /* per pool */
    int max_bytes;          /* reply bytes per pool */
    const struct vm_proc_info **procs; /* owned array of static table rows */
    int nprocs;
};

struct vm_upstream_cfg {
    char *name;
    char *uri_text;
    struct vm_uri uri;
    struct vm_pool_cfg pool;
    struct vm_tls_cfg *tls; /* set for DRIVER+tls:// upstreams */
    char *sasl_user;        /* upstreams[].sasl.username: the gateway's own SASL identity */
    char *sasl_password_file;
    struct vm_cache_cfg cache;
};

struct vm_config {
    struct vm_listener_cfg *listeners;
    int nlisteners;
    struct vm_upstream_cfg *upstreams;
    int nupstreams;
    struct vm_upstream_cfg *templates; /* upstream_templates: name = the "match" glob, uri_text
                                        * with "{name}", uri parsed from a sample (unused) */
    int ntemplates;
    int max_upstreams;      /* upstreams made from templates existing at once */
    char *default_upstream; /* may be NULL */
    int routing_strict;     /* a first path segment that is no upstream is an error */
    int max_clients;
    int queue_timeout_ms;
    int max_client_requests;
    int max_unauthenticated;
    int max_unauthenticated_per_source;
    int auth_timeout_s;
    int drain_timeout_s;
    int keepalive_interval_s;
    int keepalive_count;
    int log_level;
    int log_json;
    int event_queue_bytes;
    int event_max_per_session;
    struct vm_sasl_cfg *sasl; /* needed by listeners with SASL */
    char *admin_address;    /* HTTP status endpoint, or NULL */
    char *admin_unix;
    char *admin_token;      /* admin.token_file's token (secret), or NULL: no token needed */
    char *process_user;     /* drop to this user after start-up, or NULL */
    char *process_group;    /* ... and this group (NULL: the user's primary group) */
    int policy_present;     /* a policy section was given */
    struct vm_rule *rules;
    int nrules;
    struct vm_rule default_rule;
};

/* Load and validate `path`. Returns NULL after printing every error, each naming its JSON
 * path (e.g. `upstreams[1].uri: unsupported transport "ssh"`), to `errs`. */
struct vm_config *config_load(const char *path, FILE *errs);
/* Same, from a string (tests). */
struct vm_config *config_parse(const char *json, FILE *errs);
void config_free(struct vm_config *cfg);

/* Print to `out` one warning line per questionable but valid setting (an upstream named like
 * a path libvirt URIs use, such as "system", captures those URIs). Returns how many. */
int config_warn(const struct vm_config *cfg, FILE *out);
/* True when `p` points into `cfg` (a listener, upstream, template or rule): what keeps a
 * snapshot alive. */
int config_owns(const struct vm_config *cfg, const void *p);
/* Reload: an upstream whose connections may be shared as they are (same URI, pool, TLS files,
 * SASL login), a listener whose socket may stay (same address or path, mode, TLS or not),
 * an unchanged sasl section. */
int config_upstream_same(const struct vm_upstream_cfg *a, const struct vm_upstream_cfg *b);
int config_listener_same_socket(const struct vm_listener_cfg *a, const struct vm_listener_cfg *b);
int config_sasl_same(const struct vm_sasl_cfg *a, const struct vm_sasl_cfg *b);

/* The upstream called `name`, or NULL. */
const struct vm_upstream_cfg *config_upstream(const struct vm_config *cfg, const char *name);
/* The first upstream template whose "match" glob matches `name`, or NULL (the name is not
 * checked here: router.c does that before anything is made from it). */
const struct vm_upstream_cfg *config_template(const struct vm_config *cfg, const char *name);

#endif
