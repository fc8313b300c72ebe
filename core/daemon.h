/* Running as a service: daemonizing (-D), the pidfile, dropping privileges, systemd's sd_notify. */
#ifndef AIGW_CORE_DAEMON_H
#define AIGW_CORE_DAEMON_H

#include <sys/types.h>

#include "core/conf.h"

/* aigw -D: forks; the parent waits until the daemon is up (daemon_ready) and exits 0, or exits 1
 * when the daemon ends first (its error is already on the shared stderr). Returns 0 in the
 * daemon, after setsid(). Does nothing under systemd (NOTIFY_SOCKET set): systemd supervises
 * the process it started. Returns -errno when it cannot fork. */
int daemon_start(void);

/* The daemon is set up and about to start its children: stdin and stdout go to /dev/null, and
 * stderr too when it is a terminal (a file or pipe the operator redirected it to keeps the
 * log). Nothing without -D. */
void daemon_detach_stdio(void);

/* The master's children are started: the -D parent exits 0, systemd gets READY=1. */
void daemon_ready(void);

/* Binary upgrade, old master: systemd's main process is the new master (`pid`) from now on. */
void daemon_mainpid(pid_t pid);

/* A stop began: systemd gets STOPPING=1. */
void daemon_stopping(void);

/* In a forked child: closes the -D readiness pipe so that only the master holds it. */
void daemon_child_after_fork(void);

/* Refuses (-EEXIST, logged) when the pidfile names a live process, else writes our pid. */
int daemon_pidfile_write(const char *path);

/* Binary upgrade, new master: writes our pid over the old master's (`prev`, still alive). */
int daemon_pidfile_replace(const char *path, pid_t prev);

/* Binary upgrade, old master: the pidfile is the new master's now; never remove it. */
void daemon_pidfile_forget(void);

/* Removes the pidfile this process wrote, if any. */
void daemon_pidfile_remove(void);

/* Checks, before anything is bound, that user/group can be taken: as non-root only the
 * current ones. Returns 0 or -EPERM (logged). */
int daemon_priv_check(const struct conf_global *g);

/* Gives the admin socket its owner (the user aigw runs as) and, with admin_group, that group and
 * mode 0660. Returns 0 or -errno (logged). */
int daemon_admin_perms(const char *path, const struct conf_global *g);

/* setgroups, setgid, setuid to [global] user/group; checks root cannot be taken back. Returns 0
 * or -errno (logged). Nothing when neither is set. */
int daemon_drop_privileges(const struct conf_global *g);

#endif
