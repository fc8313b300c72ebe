/* Running as a service: -D (fork, setsid, readiness through a pipe), the pidfile, the privilege
 * drop after binding, and sd_notify for systemd's Type=notify. */
#include "core/daemon.h"

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "core/log.h"

static int daemon_pipe = -1;               /* -D: write end, the parent waits on it */
static int daemon_detached;                /* -D was acted on */
static char daemon_pidfile[CONF_PATH_MAX]; /* written by this process; "" = none */
static pid_t daemon_pidfile_pid;           /* the pid in it: a child never removes it */

static int daemon_under_systemd(void)
{
    const char *s = getenv("NOTIFY_SOCKET");
    return s && s[0];
}

/* The parent's side of -D: exit 0 once the daemon says it is up, 1 when it ends first. */
static void __attribute__((noreturn)) daemon_parent_wait(int fd, pid_t pid)
{
    char c;
    ssize_t n;
    int status;

    while ((n = read(fd, &c, 1)) == -1 && errno == EINTR)
        ;
    if (n == 1)
        _exit(0);
    /* EOF: it failed to start; its reason went to the stderr we share */
    while (waitpid(pid, &status, 0) == -1 && errno == EINTR)
        ;
    _exit(WIFEXITED(status) && WEXITSTATUS(status) ? WEXITSTATUS(status) : 1);
}

int daemon_start(void)
{
    int fds[2];
    pid_t pid;

    if (daemon_under_systemd()) {
        log_info("started by systemd (NOTIFY_SOCKET is set): -D ignored, not daemonizing");
        return 0;
    }
    if (pipe2(fds, O_CLOEXEC) == -1) {
        log_err("-D: cannot create a pipe: %s", strerror(errno));
        return -errno;
    }
    pid = fork();
    if (pid == -1) {
        int err = errno;
        log_err("-D: cannot fork: %s", strerror(err));
        close(fds[0]);
        close(fds[1]);
        return -err;
    }
    if (pid > 0) {
        close(fds[1]);
        daemon_parent_wait(fds[0], pid);
    }
    close(fds[0]);
    daemon_pipe = fds[1];
    daemon_detached = 1;
    setsid();               /* cannot fail: a fresh child is never a process group leader */
    log_set_role("master"); /* refreshes the pid in log lines */
    return 0;
}

static void daemon_null(int fd, int flags)
{
    int null = open("/dev/null", flags | O_CLOEXEC);
    if (null == -1)
        return;
    if (null != fd) {
        dup2(null, fd); /* dup2 clears O_CLOEXEC on fd */
        close(null);
    }
}

void daemon_detach_stdio(void)
{
    if (!daemon_detached)
        return;
    daemon_null(STDIN_FILENO, O_RDONLY);
    daemon_null(STDOUT_FILENO, O_WRONLY);
    /* A terminal will be closed by the operator's logout; a file or pipe they chose keeps the
     * log. */
    if (isatty(STDERR_FILENO)) {
        log_info("daemonized: logging stops here (stderr is a terminal; redirect it to a file "
                 "to keep the log)");
        daemon_null(STDERR_FILENO, O_WRONLY);
    }
}

void daemon_ready(void)
{
    if (daemon_pipe >= 0) {
        char c = 1;
        while (write(daemon_pipe, &c, 1) == -1 && errno == EINTR)
            ;
        close(daemon_pipe);
        daemon_pipe = -1;
    }
    if (daemon_under_systemd())
        sd_notifyf(0, "READY=1\nMAINPID=%d\nSTATUS=serving", (int)getpid());
}

void daemon_mainpid(pid_t pid)
{
    if (daemon_under_systemd())
        sd_notifyf(0, "MAINPID=%d", (int)pid);
}

void daemon_stopping(void)
{
    if (daemon_under_systemd())
        sd_notify(0, "STOPPING=1");
}

void daemon_child_after_fork(void)
{
    if (daemon_pipe >= 0)
        close(daemon_pipe);
    daemon_pipe = -1;
}

/* ---- pidfile ---- */

/* The pid in an existing pidfile, 0 when there is none or it holds no pid. */
static pid_t daemon_pidfile_read(const char *path)
{
    char buf[32];
    ssize_t n;
    long pid;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd == -1)
        return 0;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    pid = strtol(buf, NULL, 10);
    return pid > 0 && pid <= 0x7fffffff ? (pid_t)pid : 0;
}

/* Writes our pid; a live process other than `allow` named in the file is refused. */
static int daemon_pidfile_put(const char *path, pid_t allow)
{
    char buf[32];
    pid_t old = daemon_pidfile_read(path);
    int fd, len, rc = 0;

    /* kill(pid, 0) fails with EPERM for a live process of another user */
    if (old > 0 && old != getpid() && old != allow && (kill(old, 0) == 0 || errno == EPERM)) {
        log_err("pidfile %s: aigw is already running as pid %d (stop it first; if that pid is "
                "not aigw, remove the file)",
                path, (int)old);
        return -EEXIST;
    }
    if (old > 0 && old != allow)
        log_info("pidfile %s: pid %d is not running any more, replacing the file", path, (int)old);
    /* a new file renamed over the old one: after a privilege drop (a binary upgrade) only
     * the directory needs to be writable, not a file root created */
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid()) >= (int)sizeof(tmp)) {
        log_err("cannot write pidfile %s: path too long", path);
        return -ENAMETOOLONG;
    }
    /* The master is still root here and the directory may be the user's (/run/aigw): a link
     * planted at the temporary name must not make it truncate another file. A stale one (or a
     * link) goes, and the name is created anew, never followed. */
    if (unlink(tmp) == -1 && errno != ENOENT)
        log_warn("pidfile %s: cannot remove %s: %s", path, tmp, strerror(errno));
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd == -1) {
        rc = -errno;
        log_err("cannot write pidfile %s: %s", path, strerror(-rc));
        return rc;
    }
    len = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    if (write(fd, buf, (size_t)len) != len)
        rc = errno ? -errno : -EIO;
    if (close(fd) == -1 && !rc)
        rc = -errno;
    if (!rc && rename(tmp, path) == -1)
        rc = -errno;
    if (rc < 0) {
        log_err("cannot write pidfile %s: %s", path, strerror(-rc));
        unlink(tmp);
        return rc;
    }
    snprintf(daemon_pidfile, sizeof(daemon_pidfile), "%s", path);
    daemon_pidfile_pid = getpid();
    return 0;
}

int daemon_pidfile_write(const char *path)
{
    return daemon_pidfile_put(path, 0);
}

int daemon_pidfile_replace(const char *path, pid_t prev)
{
    return daemon_pidfile_put(path, prev);
}

void daemon_pidfile_forget(void)
{
    daemon_pidfile[0] = '\0';
}

void daemon_pidfile_remove(void)
{
    if (!daemon_pidfile[0] || daemon_pidfile_pid != getpid())
        return;
    /* After a privilege drop this needs the directory to be writable by user = */
    if (unlink(daemon_pidfile) == -1 && errno != ENOENT)
        log_warn("cannot remove pidfile %s: %s", daemon_pidfile, strerror(errno));
    daemon_pidfile[0] = '\0';
}

/* ---- privileges ---- */

int daemon_priv_check(const struct conf_global *g)
{
    if (geteuid() == 0)
        return 0;
    if ((g->uid < 0 || g->uid == (int64_t)geteuid()) &&
        (g->gid < 0 || g->gid == (int64_t)getegid()))
        return 0; /* already the user and group asked for */
    log_err("[global] user = %s, group = %s: aigw runs as uid %d gid %d and may not switch "
            "(start it as root, or remove user and group)",
            g->user[0] ? g->user : "(unset)", g->group[0] ? g->group : "(unset)", (int)geteuid(),
            (int)getegid());
    return -EPERM;
}

int daemon_admin_perms(const char *path, const struct conf_global *g)
{
    uid_t uid = g->uid >= 0 && geteuid() == 0 ? (uid_t)g->uid : (uid_t)-1;
    gid_t gid = g->admin_gid >= 0 ? (gid_t)g->admin_gid : (gid_t)-1;

    if ((uid != (uid_t)-1 || gid != (gid_t)-1) && chown(path, uid, gid) == -1) {
        int err = errno;
        log_err("cannot give admin socket %s to %s%s%s%s%s: %s%s", path,
                uid != (uid_t)-1 ? "user " : "", uid != (uid_t)-1 ? g->user : "",
                uid != (uid_t)-1 && gid != (gid_t)-1 ? ", " : "",
                gid != (gid_t)-1 ? "admin_group " : "", gid != (gid_t)-1 ? g->admin_group : "",
                strerror(err),
                err == EPERM && geteuid() != 0
                    ? " (aigw is not root: it must be a member of admin_group)"
                    : "");
        return -err;
    }
    if (gid != (gid_t)-1 && chmod(path, 0660) == -1) {
        int err = errno;
        log_err("cannot chmod admin socket %s: %s", path, strerror(err));
        return -err;
    }
    return 0;
}

int daemon_drop_privileges(const struct conf_global *g)
{
    gid_t gid;
    uid_t uid;

    if (g->uid < 0 && g->gid < 0)
        return 0;
    gid = g->gid >= 0 ? (gid_t)g->gid : getegid();
    uid = g->uid >= 0 ? (uid_t)g->uid : geteuid();
    if (geteuid() != 0)
        return 0; /* daemon_priv_check made sure these are the current ones */
    /* groups first: once uid is not 0 they can no longer be changed */
    if (setgroups(1, &gid) == -1 || setgid(gid) == -1 || setuid(uid) == -1) {
        int err = errno;
        log_err("cannot switch to user %s (uid %d) group %d: %s", g->user[0] ? g->user : "root",
                (int)uid, (int)gid, strerror(err));
        return -err;
    }
    if (uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)) {
        log_err("privilege drop failed: root could be taken back");
        return -EPERM;
    }
    log_info("running as user %s (uid %d), group %s (gid %d)", g->user[0] ? g->user : "root",
             (int)uid, g->group[0] ? g->group : "primary", (int)gid);
    return 0;
}
