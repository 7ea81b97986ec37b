/* virtmux: the executable. Options, signals and the event loop; the engine is in src/. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "config.h"
#include "gateway.h"
#include "log.h"
#include "privs.h"
#include "version.h"

static void usage(FILE *f)
{
    fputs("usage: virtmux --config FILE [-v] [--log-format text|json]\n"
          "       virtmux --check-config FILE\n"
          "       virtmux --version | --help\n"
          "\n"
          "A libvirt connection-multiplexing gateway: libvirt clients connect to it as to\n"
          "libvirtd; their calls travel over pooled connections to one or more libvirtds.\n"
          "It runs in the foreground and logs to standard error.\n"
          "\n"
          "Options:\n"
          "  -c, --config FILE        run the gateway with this JSON config\n"
          "  -t, --check-config FILE  validate the config and exit 0 (valid) or 1 (invalid)\n"
          "  -v, --verbose            log at debug level (overrides log.level)\n"
          "      --log-format FMT     text or json (overrides log.format)\n"
          "  -V, --version            print the version and exit\n"
          "  -h, --help               print this text and exit\n"
          "\n"
          "Signals:\n"
          "  SIGTERM, SIGINT  drain: close the listeners, let calls in flight finish (up to\n"
          "                   limits.drain_timeout_s), close each session once idle and the\n"
          "                   upstream connections with CONNECT_CLOSE, exit 0; a second\n"
          "                   signal stops at once\n"
          "  SIGHUP           reload the config file: checked first (if invalid, the running\n"
          "                   one stays and the errors are logged); listeners open and close,\n"
          "                   upstreams and policy change for new sessions, TLS files are\n"
          "                   re-read; sessions already open keep what they had\n"
          "  SIGUSR1          log pools, upstream connections and calls in flight\n"
          "\n"
          "Exit status: 0 stopped by a signal or config valid; 1 invalid config or start-up\n"
          "failure; 2 bad command line. Config keys: virtmux.json(5); see also virtmux(8).\n",
          f);
}

static void on_stop(evutil_socket_t sig, short what, void *arg)
{
    struct vm_gateway *gw = arg;
    if (gateway_draining(gw)) {
        vm_warn(NULL, "signal %d during the drain: stopping now", (int)sig);
        event_base_loopexit(gateway_base(gw), NULL);
        return;
    }
    vm_info(NULL, "signal %d: draining", (int)sig);
    gateway_drain(gw);
}

/* What SIGHUP needs: the file to read again and the command line's log overrides. */
struct reload_ctx {
    struct vm_gateway *gw;
    const char *path;
    int verbose, json;
};

static void on_reload(evutil_socket_t sig, short what, void *arg)
{
    struct reload_ctx *r = arg;
    vm_info(NULL, "SIGHUP: reloading %s", r->path);
    if (gateway_reload(r->gw, r->path) < 0)
        return;
    const struct vm_config *cfg = gateway_config(r->gw);
    vm_log_setup(r->verbose ? VM_LOG_DEBUG : (enum vm_log_level)cfg->log_level,
                 r->json >= 0 ? r->json : cfg->log_json);
}

static void on_status(evutil_socket_t sig, short what, void *arg)
{
    gateway_log_status(arg);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", required_argument, NULL, 't'},
        {"verbose", no_argument, NULL, 'v'},
        {"log-format", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL;
    int check_only = 0, verbose = 0, json = -1, c;
    while ((c = getopt_long(argc, argv, "c:t:vhV", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config_path = optarg;
            break;
        case 't':
            config_path = optarg;
            check_only = 1;
            break;
        case 'v':
            verbose = 1;
            break;
        case 'f':
            if (strcmp(optarg, "json") && strcmp(optarg, "text")) {
                fprintf(stderr, "virtmux: --log-format takes text or json\n");
                return 2;
            }
            json = strcmp(optarg, "json") == 0;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("virtmux %s\n", VIRTMUX_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!config_path || optind != argc) {
        usage(stderr);
        return 2;
    }

    struct vm_config *cfg = config_load(config_path, stderr);
    if (!cfg) {
        fprintf(stderr, "virtmux: %s: invalid configuration\n", config_path);
        return 1;
    }
    /* Warnings go to stderr in both modes: before logging starts, and --check-config
     * still exits 0 for a valid config. */
    config_warn(cfg, stderr);
    if (check_only) {
        printf("%s: configuration OK (%d listeners, %d upstreams)\n", config_path,
               cfg->nlisteners, cfg->nupstreams);
        config_free(cfg);
        return 0;
    }
    vm_log_setup(verbose ? VM_LOG_DEBUG : (enum vm_log_level)cfg->log_level,
                 json >= 0 ? json : cfg->log_json);
    signal(SIGPIPE, SIG_IGN);

    /* The epoll changelist folds the add/del of write interest that every forwarded packet
     * causes into one epoll_ctl per loop turn (or none). */
    struct event_config *ecfg = event_config_new();
    if (ecfg)
        event_config_set_flag(ecfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    struct event_base *base = ecfg ? event_base_new_with_config(ecfg) : event_base_new();
    if (ecfg)
        event_config_free(ecfg);
    if (!base) {
        fprintf(stderr, "virtmux: cannot create the event loop\n");
        config_free(cfg);
        return 1;
    }
    struct vm_gateway *gw = gateway_new(base, cfg);
    struct event *sigint = evsignal_new(base, SIGINT, on_stop, gw);
    struct event *sigterm = evsignal_new(base, SIGTERM, on_stop, gw);
    struct event *sigusr1 = evsignal_new(base, SIGUSR1, on_status, gw);
    struct reload_ctx reload = {gw, config_path, verbose, json};
    struct event *sighup = evsignal_new(base, SIGHUP, on_reload, &reload);
    evsignal_add(sighup, NULL);
    evsignal_add(sigint, NULL);
    evsignal_add(sigterm, NULL);
    evsignal_add(sigusr1, NULL);

    int rc = 0;
    /* Privileges go once every socket is bound and every key read, before any client. */
    if (gateway_start(gw) < 0 || privs_drop(gateway_config(gw)) < 0) {
        rc = 1;
    } else {
        vm_info(NULL, "virtmux ready");
        event_base_dispatch(base);
    }
    event_free(sigint);
    event_free(sigterm);
    event_free(sigusr1);
    event_free(sighup);
    gateway_free(gw);
    event_base_free(base);
    return rc;
}
