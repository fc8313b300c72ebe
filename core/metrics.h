/* What the [stats] listener serves, built from shm by the master: /metrics (Prometheus text
 * format 0.0.4), /status.json (the status page's data) and the status page itself. */
#ifndef AIGW_CORE_METRICS_H
#define AIGW_CORE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "core/admin.h"
#include "core/conf.h"
#include "shm/shm.h"

/* A growing text buffer; `failed` once an allocation failed (the text is then incomplete). */
struct mbuf {
    char *p;
    size_t len, cap;
    int failed;
};

void mbuf_printf(struct mbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void mbuf_free(struct mbuf *b);

/* What the master knows besides shm: its processes (show proc's list: master first). */
struct metrics_ctx {
    const struct conf *conf;
    struct shm *shm;
    const struct admin_proc *procs;
    int n_procs;
    uint64_t started_ms; /* the master's start, wall clock */
};

/* The Prometheus exposition of everything in shm, summed over the workers. 0 or -ENOMEM. */
int metrics_prometheus(const struct metrics_ctx *m, struct mbuf *out);
/* The status page's data as one JSON object. 0 or -ENOMEM. */
int metrics_status_json(const struct metrics_ctx *m, struct mbuf *out);

/* The self-contained status page (inline CSS and JS, which fetches /status.json). */
extern const char metrics_status_page[];

#endif
