/* Fuzz target: the config loader (inih, every key parser, the cross checks, error messages)
 * on arbitrary file contents. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/conf.h"
#include "test/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz-conf", 0);
    char path[64];
    struct conf *conf = NULL;
    char *err = NULL;

    if (fd == -1)
        return 0;
    if (write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    /* No secrets: env:/file: keys must not read the fuzzer's environment or files. */
    if (conf_load_flags(path, CONF_LOAD_NO_SECRETS, &conf, &err) == 0) {
        if (!conf || conf->n_listens < 1 || conf->n_pools < 1 || conf->n_backends < 1)
            abort(); /* success promises a usable config */
        conf_free(conf);
    } else if (!err || !*err) {
        abort(); /* every failure says why */
    }
    free(err);
    close(fd);
    return 0;
}
