/* Unit tests of core/log.c: the line's format on a plain stderr and on journald's stream, and
 * the rate-limited helper: once per LOG_RATE_MS, with a count of the rest. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/log.h"

static void test_log_rate(void **state)
{
    struct log_rate r = {0};
    uint64_t skipped = 99;
    char note[LOG_RATE_NOTE];

    /* the first of a burst at once, even at time 0 */
    assert_int_equal(log_rate_ok(&r, 0, &skipped), 1);
    assert_int_equal(skipped, 0);
    assert_string_equal(log_rate_note(skipped, note), "");
    /* the rest of the second is counted */
    for (uint64_t t = 1; t < LOG_RATE_MS; t += 100)
        assert_int_equal(log_rate_ok(&r, t, &skipped), 0);
    /* the next one reports them */
    assert_int_equal(log_rate_ok(&r, LOG_RATE_MS, &skipped), 1);
    assert_int_equal(skipped, 10);
    assert_string_equal(log_rate_note(skipped, note), " (10 more since the last report)");
    /* a quiet spell: the next is logged at once, with nothing to report */
    assert_int_equal(log_rate_ok(&r, 10 * LOG_RATE_MS, &skipped), 1);
    assert_int_equal(skipped, 0);
    assert_int_equal(log_rate_ok(&r, 10 * LOG_RATE_MS + 1, &skipped), 0);
}

/* Logs one line with stderr on a fresh file (JOURNAL_STREAM naming that file when journal) and
 * returns what was written. */
static void log_capture(int journal, enum log_level level, char *out, size_t size)
{
    char path[] = "/tmp/aigw-test-log-XXXXXX";
    int fd = mkstemp(path), saved = dup(STDERR_FILENO);
    struct stat st;
    char js[64];

    assert_true(fd >= 0 && saved >= 0);
    unlink(path);
    assert_int_equal(fstat(fd, &st), 0);
    if (journal) {
        snprintf(js, sizeof(js), "%llu:%llu", (unsigned long long)st.st_dev,
                 (unsigned long long)st.st_ino);
        setenv("JOURNAL_STREAM", js, 1);
    } else {
        unsetenv("JOURNAL_STREAM");
    }
    dup2(fd, STDERR_FILENO);
    log_init("test", LOG_LVL_DEBUG);
    log_msg(level, "hello %d", 42);
    dup2(saved, STDERR_FILENO);
    close(saved);
    ssize_t n = pread(fd, out, size - 1, 0);
    close(fd);
    assert_true(n > 0);
    out[n] = '\0';
    unsetenv("JOURNAL_STREAM");
}

static void test_log_line(void **state)
{
    char line[256], want[128];

    /* a file or terminal: time, pid, role, level */
    log_capture(0, LOG_LVL_WARN, line, sizeof(line));
    snprintf(want, sizeof(want), " aigw[%d] test warn: hello 42\n", (int)getpid());
    assert_int_equal(line[4], '-');
    assert_int_equal(line[23], 'Z');
    assert_string_equal(line + 24, want);
    /* journald's stream: the syslog priority first (journalctl -p err finds errors), no time */
    log_capture(1, LOG_LVL_ERR, line, sizeof(line));
    snprintf(want, sizeof(want), "<3>aigw[%d] test err: hello 42\n", (int)getpid());
    assert_string_equal(line, want);
    log_capture(1, LOG_LVL_INFO, line, sizeof(line));
    snprintf(want, sizeof(want), "<6>aigw[%d] test info: hello 42\n", (int)getpid());
    assert_string_equal(line, want);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_log_line),
        cmocka_unit_test(test_log_rate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
