/*
 * Privilege drop, in this order:
 *   1. resolve process.user (and process.group, else the user's primary group);
 *   2. initgroups: the user's supplementary groups (e.g. the group of libvirtd's socket);
 *   3. setresgid, then setresuid (the group first: afterwards we may no longer change it);
 *   4. check that setuid(0) now fails;
 *   5. check the files opened again after start-up: cyrus-sasl reopens the sasldb at each
 *      login, GSSAPI the keytab, an upstream SASL login its password file; SIGHUP rereads TLS
 *      files (only a warning: the running certificates stay).
 */
#include "privs.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"

static int set_ids(const struct passwd *pw, gid_t gid)
{
    if (initgroups(pw->pw_name, gid) < 0) {
        vm_err(NULL, "process.user: cannot set the groups of %s: %s", pw->pw_name,
               strerror(errno));
        return -1;
    }
    if (setresgid(gid, gid, gid) < 0) {
        vm_err(NULL, "process.group: cannot become gid %u: %s", (unsigned)gid, strerror(errno));
        return -1;
    }
    if (setresuid(pw->pw_uid, pw->pw_uid, pw->pw_uid) < 0) {
        vm_err(NULL, "process.user: cannot become %s (uid %u): %s", pw->pw_name,
               (unsigned)pw->pw_uid, strerror(errno));
        return -1;
    }
    if (pw->pw_uid != 0 && setuid(0) == 0) {
        vm_err(NULL, "process.user: root could be regained after becoming %s", pw->pw_name);
        return -1;
    }
    return 0;
}

/* A file the gateway must read again later: -1 (fatal) when the new user cannot. */
static int needs_read(const char *path, const char *file, const char *user, const char *why)
{
    if (!file || access(file, R_OK) == 0)
        return 0;
    vm_err(NULL, "%s: user %s cannot read \"%s\" (%s), and %s: give it to that user or "
           "its group (mode 0640)", path, user, file, strerror(errno), why);
    return -1;
}

static void tls_reload_check(const struct vm_tls_cfg *t, const char *where, const char *user)
{
    const char *files[] = {t->cert, t->key, t->ca, t->crl};
    for (int i = 0; i < 4; i++)
        if (files[i] && access(files[i], R_OK) < 0)
            vm_warn(NULL, "%s: user %s cannot read \"%s\": SIGHUP will keep the current "
                    "certificates", where, user, files[i]);
}

static int check_files(const struct vm_config *cfg, const char *user)
{
    int rc = 0;
    if (cfg->sasl) {
        rc |= needs_read("sasl.sasldb", cfg->sasl->sasldb, user,
                         "cyrus-sasl opens it at each login");
        rc |= needs_read("sasl.keytab", cfg->sasl->keytab, user,
                         "GSSAPI reads it at each login");
    }
    for (int i = 0; i < cfg->nupstreams; i++) {
        char path[96];
        snprintf(path, sizeof(path), "upstreams[%d].sasl.password_file", i);
        rc |= needs_read(path, cfg->upstreams[i].sasl_password_file, user,
                         "it is read at each upstream login");
    }
    for (int i = 0; i < cfg->nlisteners; i++)
        if (cfg->listeners[i].tls)
            tls_reload_check(cfg->listeners[i].tls, cfg->listeners[i].name, user);
    return rc ? -1 : 0;
}

int privs_drop(const struct vm_config *cfg)
{
    if (!cfg->process_user)
        return 0;
    struct passwd *pw = getpwnam(cfg->process_user);
    if (!pw) {
        vm_err(NULL, "process.user: no user \"%s\"", cfg->process_user);
        return -1;
    }
    gid_t gid = pw->pw_gid;
    if (cfg->process_group) {
        struct group *gr = getgrnam(cfg->process_group);
        if (!gr) {
            vm_err(NULL, "process.group: no group \"%s\"", cfg->process_group);
            return -1;
        }
        gid = gr->gr_gid;
    }
    if (set_ids(pw, gid) < 0)
        return -1;
    vm_info(NULL, "privileges dropped: running as user %s (uid %u), gid %u", pw->pw_name,
            (unsigned)pw->pw_uid, (unsigned)gid);
    return check_files(cfg, pw->pw_name);
}
