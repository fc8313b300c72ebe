/* Logging to stderr: one timestamped line per message, written with a single write(2). */
#include "core/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 2048

enum log_level log_level_cur = LOG_LVL_INFO;

static char log_role[16] = "aigw";
static pid_t log_pid;
static char log_last[256]; /* the last error message, without its prefix */
/* stderr is journald's stream: each line starts with its syslog priority ("<3>" for err), which
 * journald takes as the entry's priority (journalctl -p err), and no time (journald stamps it).
 * -1 = not looked at yet. */
static int log_journal = -1;

/* systemd sets JOURNAL_STREAM=DEV:INODE to what it connected stderr to; a stderr redirected
 * elsewhere since (aigw -D 2>file) no longer matches. */
static int log_journal_detect(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    return js && sscanf(js, "%llu:%llu", &dev, &ino) == 2 && fstat(STDERR_FILENO, &st) == 0 &&
           (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

static const int log_syslog_prio[] = {
    [LOG_LVL_ERR] = 3,
    [LOG_LVL_WARN] = 4,
    [LOG_LVL_INFO] = 6,
    [LOG_LVL_DEBUG] = 7,
};

static const char *const log_level_names[] = {
    [LOG_LVL_ERR] = "err",
    [LOG_LVL_WARN] = "warn",
    [LOG_LVL_INFO] = "info",
    [LOG_LVL_DEBUG] = "debug",
};

void log_init(const char *role, enum log_level level)
{
    log_level_cur = level;
    log_set_role(role);
    log_journal = log_journal_detect();
}

/* Also refreshes the cached pid: children call this right after fork. */
void log_set_role(const char *role)
{
    snprintf(log_role, sizeof(log_role), "%s", role ? role : "aigw");
    log_pid = getpid();
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    char buf[LOG_LINE_MAX];
    int saved_errno = errno;
    struct timespec ts;
    struct tm tm;
    size_t len, head;
    va_list ap;
    int n;

    if (level > log_level_cur)
        return;
    if (!log_pid)
        log_pid = getpid();
    if (log_journal < 0)
        log_journal = log_journal_detect();
    int known = (unsigned)level < sizeof(log_level_names) / sizeof(log_level_names[0]);
    if (log_journal) {
        n = snprintf(buf, sizeof(buf), "<%d>aigw[%d] %s %s: ", known ? log_syslog_prio[level] : 6,
                     (int)log_pid, log_role, known ? log_level_names[level] : "?");
    } else {
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        n = snprintf(buf, sizeof(buf),
                     "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ aigw[%d] %s %s: ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, (int)log_pid, log_role,
                     known ? log_level_names[level] : "?");
    }
    len = n > 0 ? (size_t)n : 0;
    head = len;

    va_start(ap, fmt);
    errno = saved_errno; /* so "%m" in fmt reports the caller's errno */
    n = vsnprintf(buf + len, sizeof(buf) - len, fmt, ap);
    va_end(ap);
    if (n > 0)
        len += (size_t)n;
    /* Keep room for the newline; mark a cut message so nobody mistakes it for the whole one. */
    if (len > sizeof(buf) - 2) {
        len = sizeof(buf) - 5;
        memcpy(buf + len, "...", 3);
        len += 3;
    }
    while (len > 0 && buf[len - 1] == '\n')
        len--;
    if (level == LOG_LVL_ERR) {
        size_t start = head < len ? head : len;
        snprintf(log_last, sizeof(log_last), "%.*s", (int)(len - start), buf + start);
    }
    buf[len++] = '\n';

    /* One write per line: lines of concurrent processes sharing stderr never interleave. */
    while (write(STDERR_FILENO, buf, len) == -1 && errno == EINTR)
        ;
    errno = saved_errno;
}

int log_rate_ok(struct log_rate *r, uint64_t now_ms, uint64_t *suppressed)
{
    if (r->next_ms && now_ms < r->next_ms) {
        r->suppressed++;
        return 0;
    }
    *suppressed = r->suppressed;
    r->suppressed = 0;
    r->next_ms = now_ms + LOG_RATE_MS;
    return 1;
}

const char *log_rate_note(uint64_t suppressed, char buf[LOG_RATE_NOTE])
{
    if (!suppressed)
        return "";
    snprintf(buf, LOG_RATE_NOTE, " (%llu more since the last report)",
             (unsigned long long)suppressed);
    return buf;
}

const char *log_last_err(void)
{
    return log_last;
}
