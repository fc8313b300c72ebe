/* Retry policy: outcome conditions, what an outcome counts as (the record stage), failure and
 * retry decisions, back-off, retry budget. Pure functions; the worker brings the clock and the
 * random numbers. */
#include "core/retry.h"

uint32_t retry_cond(enum upstream_err err, int status)
{
    switch (err) {
    case UPSTREAM_OK:
        break;
    case UPSTREAM_ECONNECT:
        return COND_CONNECT;
    case UPSTREAM_ETLS:
        return COND_TLS;
    case UPSTREAM_ETIMEOUT:
        return COND_TIMEOUT;
    case UPSTREAM_ESTALE:
        return COND_STALE;
    case UPSTREAM_ERESET:
    case UPSTREAM_EPROTO: /* a garbled answer is the backend's fault like a cut one */
        return COND_RESET;
    case UPSTREAM_ECLIENT:
    case UPSTREAM_ENOMEM:
    case UPSTREAM_ELOCAL: /* the gateway's own shortage: not a failure, and no retry (another
                             backend would meet it just the same) */
        return 0;         /* not the backend's doing */
    }
    if (status == 429)
        return COND_429;
    if (status >= 500 && status <= 599)
        return COND_5XX;
    return 0;
}

static int status_listed(const int *st, int n, int status)
{
    for (int i = 0; i < n; i++)
        if (st[i] == status)
            return 1;
    return 0;
}

int retry_is_failure(const struct conf_pool *p, uint32_t cond, int status)
{
    if (cond & COND_429)
        return 0;
    return (cond & p->fail_on) != 0 ||
           (status > 0 && status_listed(p->fail_on_status, p->n_fail_on_status, status));
}

int retry_is_retryable(const struct conf_pool *p, uint32_t cond, int status)
{
    return (cond & (COND_NOT_SENT | p->retry_on)) != 0 ||
           (status > 0 && status_listed(p->retry_on_status, p->n_retry_on_status, status));
}

uint32_t retry_record_head(const struct conf_pool *p, int status)
{
    uint32_t rec = 0;

    if (status == 429)
        return RETRY_REC_COOL;
    if (status == 401 || status == 403)
        rec |= RETRY_REC_AUTH;
    if (retry_is_failure(p, retry_cond(UPSTREAM_OK, status), status))
        rec |= RETRY_REC_FAIL;
    return rec;
}

uint32_t retry_record_end(const struct conf_pool *p, enum upstream_err err, int resp_started)
{
    if (err == UPSTREAM_OK)
        return RETRY_REC_OK;
    if (err == UPSTREAM_ECLIENT) /* a client that leaves mid-answer says nothing against it */
        return resp_started ? RETRY_REC_OK : 0;
    if (resp_started)
        return RETRY_REC_FAIL;
    return retry_is_failure(p, retry_cond(err, 0), 0) ? RETRY_REC_FAIL : 0;
}

uint64_t retry_backoff_ms(const struct conf_pool *p, uint32_t n, uint64_t rnd)
{
    uint64_t cap = p->retry_backoff_base_ms;
    for (uint32_t i = 1; i < n && cap < p->retry_backoff_max_ms; i++)
        cap = cap * p->retry_backoff_mult_x100 / 100;
    if (cap > p->retry_backoff_max_ms)
        cap = p->retry_backoff_max_ms;
    return cap ? rnd % (cap + 1) : 0;
}

int retry_budget_allow(uint64_t requests, uint64_t retries, uint32_t pct, uint32_t min_per_s)
{
    uint64_t allowed = requests * pct / 100;
    if (allowed < (uint64_t)min_per_s * RETRY_BUDGET_SECS)
        allowed = (uint64_t)min_per_s * RETRY_BUDGET_SECS;
    return retries < allowed;
}
