/* Unit tests of core/daemon.c: the pidfile (written by root before the privilege drop, so it must
 * never follow a link planted in its directory). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/daemon.h"

static char dir[64];

static int setup(void **state)
{
    snprintf(dir, sizeof(dir), "/tmp/aigw-test-daemon-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void file_read(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    assert_true(n >= 0);
    buf[n] = '\0';
}

static void test_pidfile_written(void **state)
{
    char path[PATH_MAX], buf[64], want[32];

    snprintf(path, sizeof(path), "%s/aigw.pid", dir);
    assert_int_equal(daemon_pidfile_write(path), 0);
    file_read(path, buf, sizeof(buf));
    snprintf(want, sizeof(want), "%d\n", (int)getpid());
    assert_string_equal(buf, want);
    daemon_pidfile_remove();
    assert_int_equal(access(path, F_OK), -1);
}

/* Someone who may write to the pidfile's directory (the user aigw drops to, owner of /run/aigw)
 * plants the temporary name the master writes first as a link to a file of root's: the master,
 * still root, must not truncate or write that file. */
static void test_pidfile_tmp_symlink_not_followed(void **state)
{
    char path[PATH_MAX], tmp[PATH_MAX + 32], victim[PATH_MAX], buf[64];
    struct stat st;
    FILE *f;

    snprintf(path, sizeof(path), "%s/aigw.pid", dir);
    snprintf(victim, sizeof(victim), "%s/victim", dir);
    snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
    f = fopen(victim, "w");
    assert_non_null(f);
    fputs("precious\n", f);
    fclose(f);
    assert_int_equal(symlink(victim, tmp), 0);

    int rc = daemon_pidfile_write(path);
    file_read(victim, buf, sizeof(buf));
    assert_string_equal(buf, "precious\n");
    if (rc == 0) { /* written, then the pidfile is a file of its own, not the link */
        assert_int_equal(lstat(path, &st), 0);
        assert_true(S_ISREG(st.st_mode));
        daemon_pidfile_remove();
    }
    unlink(tmp);
    unlink(victim);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pidfile_written),
        cmocka_unit_test(test_pidfile_tmp_symlink_not_followed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
