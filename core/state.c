/* The state file: a versioned line format, written atomically, read back by section name.
 *
 *   aigw-state 1
 *   saved 1773615600
 *   budget NAME period=month start=1772323200 spent=1234
 *   usage key|model|backend NAME requests=N prompt=N completion=N cached=N reasoning=N
 *         partial=N cost=N list_cost=N                       (one line)
 *   end
 *
 * Names are written with %XX for '%', spaces, controls and bytes >= 0x7f. Money in nano-USD.
 * Unknown fields of a known line are skipped (a newer minor writer); unknown lines are errors,
 * and so is a second line for the same budget or the same usage KIND NAME of a name the
 * configuration knows (lines of names it does not know are skipped unchecked). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/conf.h"
#include "core/log.h"
#include "core/state.h"

#define STATE_LINE_MAX 4096

/* ---- save -------------------------------------------------------------------------------------
 */

static void put_name(FILE *f, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p <= ' ' || *p >= 0x7f || *p == '%')
            fprintf(f, "%%%02X", *p);
        else
            fputc(*p, f);
    }
}

static void put_usage(FILE *f, const char *kind, const char *name, const struct acct_usage *u)
{
    fprintf(f, "usage %s ", kind);
    put_name(f, name);
    fprintf(f,
            " requests=%" PRIu64 " prompt=%" PRIu64 " completion=%" PRIu64 " cached=%" PRIu64
            " reasoning=%" PRIu64 " partial=%" PRIu64 " cost=%" PRIu64 " list_cost=%" PRIu64 "\n",
            u->requests, u->prompt, u->completion, u->cached, u->reasoning, u->partial,
            u->cost_nano, u->list_cost_nano);
}

/* 0, or -EBUSY with *busy the name of the key whose limiter's lock was not had in time. */
static int put_all(FILE *f, const struct state_names *nm, struct limit_region *limits,
                   const struct acct_region *acct, int64_t wall_s, const char **busy)
{
    static const enum acct_kind kinds[3] = {ACCT_KEY, ACCT_MODEL, ACCT_BACKEND};
    const char *const *names[3] = {nm->keys, nm->models, nm->backends};
    uint32_t counts[3] = {nm->n_keys, nm->n_models, nm->n_backends};

    fprintf(f, "aigw-state %d\nsaved %" PRId64 "\n", STATE_VERSION, wall_s);
    for (uint32_t i = 0; limits && i < nm->n_keys && i < limit_region_count(limits); i++) {
        struct limit_budget b;

        int rc = limit_budget_get(limits, i, &b);

        if (rc == -EBUSY) {
            /* A worker stopped holding the lock: writing the file without this key's budget
             * would reset it at the next start. Keep the previous file whole instead. */
            *busy = nm->keys[i];
            return rc;
        }
        if (rc != 0)
            continue;
        fputs("budget ", f);
        put_name(f, nm->keys[i]);
        fprintf(f, " period=%s start=%" PRId64 " spent=%" PRIu64 "\n", limit_period_str(b.period),
                b.period_start, b.spent_nano);
    }
    for (int k = 0; acct && k < 3; k++) {
        for (uint32_t i = 0; i < counts[k] && i < acct_count(acct, kinds[k]); i++) {
            struct acct_usage u;

            if (acct_get(acct, kinds[k], i, &u) == 0)
                put_usage(f, acct_kind_str(kinds[k]), names[k][i], &u);
        }
    }
    fputs("end\n", f);
    return 0;
}

static int fail(char **err, int rc, const char *path, const char *what)
{
    if (err && asprintf(err, "%s: %s: %s", path, what, strerror(-rc)) < 0)
        *err = NULL;
    return rc;
}

int state_save(const char *path, const struct state_names *names, struct limit_region *limits,
               const struct acct_region *acct, int64_t wall_s, char **err)
{
    char *tmp = NULL, *dir = NULL, *slash;
    FILE *f = NULL;
    int fd = -1, rc = 0;

    if (asprintf(&tmp, "%s.tmpXXXXXX", path) < 0 || !(dir = strdup(path))) {
        free(tmp);
        return fail(err, -ENOMEM, path, "cannot save");
    }
    slash = strrchr(dir, '/');
    if (!slash)
        strcpy(dir, ".");
    else if (slash == dir)
        slash[1] = '\0';
    else
        *slash = '\0';

    /* The temp file in the same directory, so the rename is atomic. */
    fd = mkstemp(tmp);
    if (fd == -1) {
        rc = fail(err, -errno, tmp, "cannot create");
        goto out;
    }
    f = fdopen(fd, "w");
    if (!f) {
        rc = fail(err, -errno, tmp, "cannot write");
        close(fd);
        goto out_unlink;
    }
    const char *busy = NULL;
    if (put_all(f, names, limits, acct, wall_s, &busy) < 0) {
        rc = -EBUSY;
        if (err && asprintf(err,
                            "%s: not saved, the previous file is kept: the limiter of key '%s' "
                            "is busy (a worker stopped while holding it?); tried again at the "
                            "next save",
                            path, busy) < 0)
            *err = NULL;
        fclose(f);
        goto out_unlink;
    }
    if (fflush(f) != 0 || ferror(f)) {
        rc = fail(err, -(errno ? errno : EIO), tmp, "cannot write");
        fclose(f);
        goto out_unlink;
    }
    if (fsync(fileno(f)) == -1) {
        rc = fail(err, -errno, tmp, "cannot fsync");
        fclose(f);
        goto out_unlink;
    }
    if (fclose(f) != 0) {
        rc = fail(err, -errno, tmp, "cannot close");
        goto out_unlink;
    }
    if (rename(tmp, path) == -1) {
        rc = fail(err, -errno, path, "cannot rename the temp file to");
        goto out_unlink;
    }
    /* The rename itself is durable only once the directory is. */
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd == -1 || fsync(fd) == -1)
        rc = fail(err, -errno, dir, "cannot fsync the directory");
    if (fd != -1)
        close(fd);
    goto out;
out_unlink:
    unlink(tmp);
out:
    free(tmp);
    free(dir);
    return rc;
}

/* ---- load -------------------------------------------------------------------------------------
 */

/* Decodes %XX in place; -1 for a bad escape. */
static int unescape(char *s)
{
    char *w = s;

    for (char *p = s; *p; p++) {
        if (*p == '%') {
            unsigned v;

            if (sscanf(p + 1, "%2x", &v) != 1 || !p[1] || !p[2] || v == 0)
                return -1;
            *w++ = (char)v;
            p += 2;
        } else {
            *w++ = *p;
        }
    }
    *w = '\0';
    return 0;
}

static int find_name(const char *const *names, uint32_t n, const char *s)
{
    for (uint32_t i = 0; i < n; i++)
        if (names[i] && strcmp(names[i], s) == 0)
            return (int)i;
    return -1;
}

static int parse_u64(const char *s, uint64_t *v)
{
    char *end;

    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    *v = strtoull(s, &end, 10);
    return errno || *end ? -1 : 0;
}

static int parse_i64(const char *s, int64_t *v)
{
    char *end;

    if (!*s)
        return -1;
    errno = 0;
    *v = strtoll(s, &end, 10);
    return errno || *end ? -1 : 0;
}

/* One "k=v" field of a budget line into *b; unknown names are skipped. */
static const char *budget_field(char *kv, struct limit_budget *b)
{
    char *eq = strchr(kv, '=');
    uint64_t u;

    if (!eq)
        return "expected name=value";
    *eq++ = '\0';
    if (strcmp(kv, "period") == 0)
        return limit_period_parse(eq, &b->period) ? "bad period" : NULL;
    if (strcmp(kv, "start") == 0)
        return parse_i64(eq, &b->period_start) ? "bad start" : NULL;
    if (strcmp(kv, "spent") == 0) {
        if (parse_u64(eq, &u))
            return "bad spent";
        b->spent_nano = u;
    }
    return NULL;
}

static const char *usage_field(char *kv, struct acct_usage *u)
{
    static const char *const fields[ACCT_WORDS] = {
        "requests", "prompt", "completion", "cached", "reasoning", "partial", "cost", "list_cost"};
    uint64_t w[ACCT_WORDS];
    char *eq = strchr(kv, '=');

    if (!eq)
        return "expected name=value";
    *eq++ = '\0';
    memcpy(w, u, sizeof(w));
    for (size_t k = 0; k < ACCT_WORDS; k++) {
        if (strcmp(kv, fields[k]) == 0) {
            if (parse_u64(eq, &w[k]))
                return "bad number";
            memcpy(u, w, sizeof(w));
            return NULL;
        }
    }
    return NULL;
}

/* One reading of the file. */
struct load {
    const char *path;
    const struct state_names *nm;
    struct limit_region *limits; /* NULL: the checking pass, nothing is put back */
    struct acct_region *acct;
    int done; /* "end" was read */
    /* the lines read of each name the configuration knows: budget of key i at [i], usage of
     * key i at [n_keys + i], of model j after the keys', of backend b after the models' */
    uint8_t *seen;
};

/* A line for a known name: 0, or -1 when the file had one for it already. */
static int load_seen(struct load *ld, uint32_t at)
{
    if (ld->seen[at])
        return -1;
    ld->seen[at] = 1;
    return 0;
}

/* The saved budget of key i (named name) is put back; a budget_period changed since the save is
 * worth a word: the spent money was carried into the new kind of period, or dropped. */
static void load_budget(struct load *ld, int lineno, uint32_t i, const char *name,
                        const struct limit_budget *b)
{
    enum limit_budget_fate fate = LIMIT_BUDGET_SAME;
    struct limit_budget now;

    if (limit_budget_set(ld->limits, i, b, &fate) != 0 || fate == LIMIT_BUDGET_SAME ||
        !b->spent_nano || limit_budget_get(ld->limits, i, &now) != 0)
        return;
    log_warn("%s:%d: key '%s': budget_period is now %s, was %s when saved: the %" PRIu64
             ".%09" PRIu64 " USD spent %s",
             ld->path, lineno, name, limit_period_str(now.period), limit_period_str(b->period),
             b->spent_nano / 1000000000u, b->spent_nano % 1000000000u,
             fate == LIMIT_BUDGET_CARRIED ? "is carried into the new period"
                                          : "is dropped: the budget starts from zero");
}

/* One line (without its newline); ld->done once "end" is read. NULL or why it is wrong. */
static const char *load_line(char *line, int lineno, struct load *ld)
{
    const struct state_names *nm = ld->nm;
    char *save = NULL, *word = strtok_r(line, " ", &save), *name, *kv;

    if (lineno == 1) {
        uint64_t v;

        if (!word || strcmp(word, "aigw-state") != 0)
            return "not an aigw state file";
        word = strtok_r(NULL, " ", &save);
        if (!word || parse_u64(word, &v) || strtok_r(NULL, " ", &save))
            return "bad version line";
        return v == STATE_VERSION ? NULL : "unsupported state file version";
    }
    if (ld->done)
        return "text after 'end'";
    if (!word || word[0] == '#')
        return NULL;
    if (strcmp(word, "end") == 0) {
        ld->done = 1;
        return NULL;
    }
    if (strcmp(word, "saved") == 0)
        return NULL;
    if (strcmp(word, "budget") == 0) {
        struct limit_budget b = {0};
        int i;

        name = strtok_r(NULL, " ", &save);
        if (!name || unescape(name))
            return "bad name";
        while ((kv = strtok_r(NULL, " ", &save)) != NULL) {
            const char *why = budget_field(kv, &b);

            if (why)
                return why;
        }
        i = find_name(nm->keys, nm->n_keys, name);
        if (i >= 0 && load_seen(ld, (uint32_t)i) < 0)
            return "a second budget line for this key";
        if (i >= 0 && ld->limits && (uint32_t)i < limit_region_count(ld->limits))
            load_budget(ld, lineno, (uint32_t)i, name, &b);
        return NULL;
    }
    if (strcmp(word, "usage") == 0) {
        struct acct_usage u = {0};
        char *kind = strtok_r(NULL, " ", &save);
        const char *const *names;
        enum acct_kind k;
        uint32_t n, base = nm->n_keys; /* where its kind's marks start in ld->seen */
        int i;

        if (!kind)
            return "missing kind";
        if (strcmp(kind, "key") == 0)
            k = ACCT_KEY, names = nm->keys, n = nm->n_keys;
        else if (strcmp(kind, "model") == 0)
            k = ACCT_MODEL, names = nm->models, n = nm->n_models, base += nm->n_keys;
        else if (strcmp(kind, "backend") == 0)
            k = ACCT_BACKEND, names = nm->backends, n = nm->n_backends,
            base += nm->n_keys + nm->n_models;
        else
            return "unknown usage kind";
        name = strtok_r(NULL, " ", &save);
        if (!name || unescape(name))
            return "bad name";
        while ((kv = strtok_r(NULL, " ", &save)) != NULL) {
            const char *why = usage_field(kv, &u);

            if (why)
                return why;
        }
        i = find_name(names, n, name);
        if (i >= 0 && load_seen(ld, base + (uint32_t)i) < 0)
            return "a second usage line for this name";
        if (i >= 0 && ld->acct && (uint32_t)i < acct_count(ld->acct, k))
            acct_base_set(ld->acct, k, (uint32_t)i, &u);
        return NULL;
    }
    return "unknown line";
}

int state_names_build(const struct conf *conf, const char ***ptrs, struct state_names *out)
{
    size_t n = (size_t)(conf->n_keys + conf->n_models + conf->n_backends);
    const char **p = calloc(n ? n : 1, sizeof(*p));

    if (!p)
        return -ENOMEM;
    for (int i = 0; i < conf->n_keys; i++)
        p[i] = conf->keys[i].name;
    for (int i = 0; i < conf->n_models; i++)
        p[conf->n_keys + i] = conf->models[i].name;
    for (int i = 0; i < conf->n_backends; i++)
        p[conf->n_keys + conf->n_models + i] = conf->backends[i].name;
    *out = (struct state_names){p,
                                (uint32_t)conf->n_keys,
                                p + conf->n_keys,
                                (uint32_t)conf->n_models,
                                p + conf->n_keys + conf->n_models,
                                (uint32_t)conf->n_backends};
    *ptrs = p;
    return 0;
}

/* Reads the whole file, putting back what it holds when limits / acct are given. */
static int load_pass(FILE *f, const char *path, const struct state_names *names,
                     struct limit_region *limits, struct acct_region *acct, char **err)
{
    char line[STATE_LINE_MAX];
    const char *why = NULL;
    int lineno = 0;
    size_t n_seen = (size_t)names->n_keys * 2 + names->n_models + names->n_backends;
    struct load ld = {path, names, limits, acct, 0, calloc(n_seen ? n_seen : 1, 1)};

    if (!ld.seen)
        return fail(err, -ENOMEM, path, "cannot read");

    while (fgets(line, sizeof(line), f)) {
        size_t len = strlen(line);

        lineno++;
        if (len == 0 || line[len - 1] != '\n') {
            why = feof(f) ? "line without an end (file cut short)" : "line too long";
            break;
        }
        line[len - 1] = '\0';
        if ((why = load_line(line, lineno, &ld)) != NULL)
            break;
    }
    free(ld.seen);
    if (!why && ferror(f))
        return fail(err, -EIO, path, "cannot read");
    if (!why && !ld.done) {
        why = lineno ? "file ends before 'end' (cut short)" : "empty file";
        lineno++;
    }
    if (why) {
        if (err && asprintf(err, "%s:%d: %s", path, lineno, why) < 0)
            *err = NULL;
        return -EINVAL;
    }
    return 0;
}

int state_load(const char *path, const struct state_names *names, struct limit_region *limits,
               struct acct_region *acct, char **err)
{
    FILE *f = fopen(path, "re");
    int rc;

    if (!f) {
        if (errno == ENOENT)
            return -ENOENT;
        return fail(err, -errno, path, "cannot open");
    }
    /* The whole file is checked before anything of it is taken: a damaged file puts back
     * nothing. */
    rc = load_pass(f, path, names, NULL, NULL, err);
    if (rc == 0) {
        rewind(f);
        rc = load_pass(f, path, names, limits, acct, err);
    }
    fclose(f);
    return rc;
}
