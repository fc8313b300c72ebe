/* aigw: the gateway's entry point. Checks (-t) or loads the configuration and runs the master,
 * in the background with -D. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/conf.h"
#include "core/daemon.h"
#include "core/log.h"
#include "core/master.h"
#include "core/state.h"
#include "core/upgrade.h"

#ifndef AIGW_VERSION
#define AIGW_VERSION "unknown"
#endif

static void print_warning(void *arg, const char *msg)
{
    fprintf(arg, "warning: %s\n", msg);
}

static void log_warning(void *arg, const char *msg)
{
    (void)arg;
    log_warn("%s", msg);
}

static void usage(FILE *out)
{
    fprintf(out, "usage: aigw [-t] [-D] -c FILE\n"
                 "  -c FILE  configuration file (INI, see etc/demo.ini)\n"
                 "  -t       check the configuration and exit (0 = valid, 1 = not)\n"
                 "  -D       run in the background; exits 0 once serving, 1 if the start fails\n"
                 "           (ignored under systemd)\n"
                 "  -v       print the version and exit\n"
                 "  -h       print this help and exit\n");
}

/* -t: a state file that would stop the start (damaged, unreadable) fails the check too. */
static int check_state_file(const struct conf *conf)
{
    struct state_names names;
    const char **ptrs = NULL;
    char *err = NULL;
    int rc;

    if (!conf->global.state_file[0])
        return 0;
    if (state_names_build(conf, &ptrs, &names) < 0) {
        fprintf(stderr, "aigw: out of memory\n");
        return -1;
    }
    rc = state_load(conf->global.state_file, &names, NULL, NULL, &err);
    free(ptrs);
    if (rc == -ENOENT)
        return 0; /* a first start: usage and budgets start from zero */
    if (rc < 0) {
        fprintf(stderr, "%s (aigw would not start: move the file away to start from zero)\n",
                err ? err : "bad state file");
        free(err);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    struct conf *conf = NULL;
    char *err = NULL;
    int test = 0, detach = 0, opt;

    while ((opt = getopt(argc, argv, "c:tDhv")) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 't':
            test = 1;
            break;
        case 'D':
            detach = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'v':
            printf("aigw %s\n", AIGW_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!path || optind != argc) {
        if (optind != argc)
            fprintf(stderr, "aigw: unexpected argument '%s'\n", argv[optind]);
        else
            fprintf(stderr, "aigw: missing -c FILE\n");
        usage(stderr);
        return 2;
    }

    upgrade_init(argv, AIGW_VERSION);
    if (conf_load(path, &conf, &err) < 0) {
        fprintf(stderr, "%s\n", err ? err : "aigw: cannot load the configuration");
        upgrade_child_fail(err);
        free(err);
        return 1;
    }
    if (test) {
        conf_warnings(conf, print_warning, stderr);
        if (check_state_file(conf) < 0) {
            conf_free(conf);
            return 1;
        }
        printf("configuration file %s is valid\n", path);
        conf_free(conf);
        return 0;
    }

    log_init("master", conf->global.log_level);
    conf_warnings(conf, log_warning, NULL);
    /* A client or upstream that closes early must cost an EPIPE, not the process. */
    signal(SIGPIPE, SIG_IGN);
    /* a new master of a binary upgrade is detached already: the old master's child */
    if (detach && !upgrade_is_child() && daemon_start() < 0) {
        conf_free(conf);
        return 1;
    }
    return master_run(conf);
}
