/* Runs a fuzz target without libFuzzer: every file of the corpus directories given, then, from
 * each, a bounded number of mutated copies (bit flips, byte changes, cuts, splices) drawn from a
 * fixed seed, so a run is repeatable. Crashes and sanitizer reports fail it. Usage:
 * fuzz_X [-n MUTATIONS] DIR... */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "test/fuzz/fuzz.h"

#define INPUT_MAX (64 * 1024)

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t mutate(uint8_t *buf, size_t len, const uint8_t *other, size_t olen)
{
    static const char *const tokens[] = {"\r\n",
                                         "=",
                                         "[",
                                         "]",
                                         "\"",
                                         "\\",
                                         "{",
                                         "}",
                                         ":",
                                         ",",
                                         "0",
                                         "-1",
                                         "99999999999999999999",
                                         "%",
                                         "..",
                                         "ms",
                                         "k",
                                         "env:",
                                         "file:",
                                         "http://",
                                         "[::1]"};
    int rounds = 1 + (int)(next() % 4);

    for (int r = 0; r < rounds; r++) {
        size_t pos = len ? next() % len : 0;

        switch (next() % 6) {
        case 0: /* flip a bit */
            if (len)
                buf[pos] ^= (uint8_t)(1u << (next() % 8));
            break;
        case 1: /* random byte */
            if (len)
                buf[pos] = (uint8_t)next();
            break;
        case 2: /* cut */
            len = pos;
            break;
        case 3: /* delete a run */
            if (len) {
                size_t n = 1 + next() % (len - pos);

                memmove(buf + pos, buf + pos + n, len - pos - n);
                len -= n;
            }
            break;
        case 4: { /* insert a token */
            const char *t = tokens[next() % (sizeof(tokens) / sizeof(tokens[0]))];
            size_t n = strlen(t);

            if (len + n <= INPUT_MAX) {
                memmove(buf + pos + n, buf + pos, len - pos);
                memcpy(buf + pos, t, n);
                len += n;
            }
            break;
        }
        default: /* splice in a piece of another input */
            if (olen) {
                size_t from = next() % olen, n = 1 + next() % (olen - from);

                if (pos + n > INPUT_MAX)
                    n = INPUT_MAX - pos;
                memcpy(buf + pos, other + from, n);
                if (pos + n > len)
                    len = pos + n;
            }
        }
    }
    return len;
}

struct input {
    uint8_t *p;
    size_t len;
};

static int load_dir(const char *dir, struct input **in, size_t *n)
{
    DIR *d = opendir(dir);
    struct dirent *e;

    if (!d) {
        fprintf(stderr, "fuzz driver: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    while ((e = readdir(d))) {
        char path[4096];
        FILE *f;

        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        f = fopen(path, "rb");
        if (!f)
            continue;
        *in = realloc(*in, sizeof(**in) * (*n + 1));
        (*in)[*n].p = malloc(INPUT_MAX);
        (*in)[*n].len = fread((*in)[*n].p, 1, INPUT_MAX, f);
        fclose(f);
        (*n)++;
    }
    closedir(d);
    return 0;
}

int main(int argc, char **argv)
{
    struct input *in = NULL;
    size_t n = 0;
    long mutations = 2000;
    uint8_t *buf = malloc(INPUT_MAX);

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc)
            mutations = strtol(argv[++i], NULL, 10);
        else if (load_dir(argv[i], &in, &n) < 0)
            return 1;
    }
    if (n == 0) {
        fprintf(stderr, "fuzz driver: no corpus files\n");
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        memcpy(buf, in[i].p, in[i].len);
        LLVMFuzzerTestOneInput(buf, in[i].len);
    }
    for (long m = 0; m < mutations; m++) {
        size_t i = (size_t)m % n, j = next() % n, len;

        memcpy(buf, in[i].p, in[i].len);
        len = mutate(buf, in[i].len, in[j].p, in[j].len);
        LLVMFuzzerTestOneInput(buf, len);
    }
    printf("%zu corpus inputs and %ld mutations ran clean\n", n, mutations);
    for (size_t i = 0; i < n; i++)
        free(in[i].p);
    free(in);
    free(buf);
    return 0;
}
