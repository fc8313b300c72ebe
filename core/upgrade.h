/* Binary upgrade (aigwctl upgrade, SIGUSR2): the master forks and executes the binary on disk with
 * its own arguments, handing over the listening sockets and the serving segment; the new master
 * says when its workers are ready, the old one stops accepting and drains. */
#ifndef AIGW_CORE_UPGRADE_H
#define AIGW_CORE_UPGRADE_H

#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "core/conf.h"

/* What the old master hands over, in the new master's environment. */
#define UPGRADE_ENV_FD     "AIGW_UPGRADE_FD"    /* its end of the socket to the old master */
#define UPGRADE_ENV_LISTEN "AIGW_LISTEN_FDS"    /* BIND=fd,fd;BIND=fd,fd;stats=fd (slot order) */
#define UPGRADE_ENV_SHM    "AIGW_UPGRADE_SHM"   /* the old serving segment's memfd */
#define UPGRADE_ENV_NAMES  "AIGW_UPGRADE_NAMES" /* memfd: the old generation's section names */
#define UPGRADE_ENV_ADMIN  "AIGW_UPGRADE_ADMIN" /* its listening admin socket */

/* A new master must say it is ready within this (else it is killed, the old one serves on). */
#define UPGRADE_READY_MS 15000

/* main: remembers the binary's path (resolved now: the file may be replaced by a new build before
 * the upgrade, which must execute the new file, not this process's deleted inode), argv and the
 * version. Reads UPGRADE_ENV_FD: whether this process is a new master started by an upgrade. */
void upgrade_init(char **argv, const char *version);

/* This process is a new master that has not taken over yet (it waits for the old one's go). */
int upgrade_is_child(void);

/* ---- the old master ---- */

/* What the serving generation hands over. */
struct upgrade_offer {
    const struct conf *conf; /* its names (keys, models, pools, backends) and listens */
    int workers;
    const int *fds; /* listening sockets, [slot * conf->n_listens + listen] */
    int stats_fd;   /* [stats] listener, -1 = none */
    int admin_fd;   /* listening admin socket, -1 = none */
    int shm_fd;     /* its segment */
    uint32_t gen;   /* its generation */
};

enum upgrade_event {
    UPGRADE_EV_READY = 0, /* the new master's workers are ready: stop accepting, then upgrade_go */
    UPGRADE_EV_SERVING,   /* it took the admin socket and serves: msg is the answer for aigwctl */
    UPGRADE_EV_FAILED,    /* it will not serve (msg says why); the old master serves on */
};

/* Forks and executes the binary; cb reports how it goes. 0, or -errno with *err (malloc'd). */
int upgrade_start(uv_loop_t *loop, const struct upgrade_offer *o,
                  void (*cb)(enum upgrade_event ev, const char *msg), char **err);

/* After UPGRADE_EV_SERVING: its answer as JSON for aigwctl --json upgrade
 * ({"ok":true,"pid":N,"version":"V","generation":G}). */
const char *upgrade_answer_json(void);

/* An upgrade is under way (started, not yet serving or failed). */
int upgrade_busy(void);

/* After UPGRADE_EV_READY, once the old generation stopped accepting: the new master takes over. */
void upgrade_go(void);

/* SIGCHLD: 1 when pid was the new master (its end is reported), else 0. */
int upgrade_reap(pid_t pid, int status);

/* ---- the new master ---- */

/* The old serving generation as the new master receives it. */
struct upgrade_inherited {
    struct conf *conf; /* names and listens (addresses only): conf_free */
    int workers;       /* sockets per listen */
    int *fds;          /* [slot * conf->n_listens + listen]: malloc'd, the caller's to close */
    int n_fds;
    int stats_fd; /* -1 = none */
    int admin_fd; /* -1 = none */
    int shm_fd;   /* -1 = none */
    uint32_t gen;
    pid_t old_pid;
};

/* Reads what the environment hands over and removes those variables (children must not see them).
 * 0, or -errno with *err (malloc'd). */
int upgrade_inherit(struct upgrade_inherited *in, char **err);

/* Starts waiting: polls ready() until it returns 1, then tells the old master, which answers go:
 * then go() runs (take the admin socket, pidfile, let the workers accept) and the old master is
 * told it serves (answer: the line aigwctl prints). gone() runs when the old master has exited. */
int upgrade_child_start(uv_loop_t *loop, int (*ready)(void), void (*go)(void), void (*gone)(void),
                        uint32_t gen);

/* A new master that fails to start: the reason goes to the old master before it exits. */
void upgrade_child_fail(const char *why);

/* The state file is this master's to write: not before an upgrade's new master took over, not
 * after the old one handed over. */
int upgrade_owns_state(void);

/* The binary a new master is started from. */
const char *upgrade_exe(void);

#endif
