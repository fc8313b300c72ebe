/* Logging to stderr: "2026-11-26T05:54:12.345Z aigw[pid] role level: message", or under
 * journald (stderr is JOURNAL_STREAM) "<3>aigw[pid] role err: message". */
#ifndef AIGW_CORE_LOG_H
#define AIGW_CORE_LOG_H

#include "core/conf.h"

void log_init(const char *role, enum log_level level);
void log_set_role(const char *role);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

extern enum log_level log_level_cur;
/* The last error logged by this process ("" = none): a failed start's reason. */
const char *log_last_err(void);

/* A message that may come in bursts (a resource running out, at every request) logged at most
 * once per LOG_RATE_MS: the first of a burst at once, the rest counted and reported by the next
 * one logged. Usage:
 *     uint64_t skipped;
 *     char note[LOG_RATE_NOTE];
 *     if (log_rate_ok(&rate, now_ms, &skipped))
 *         log_warn("...%s", log_rate_note(skipped, note)); */
#define LOG_RATE_MS 1000
struct log_rate {
    uint64_t next_ms;    /* monotonic ms before which messages are only counted */
    uint64_t suppressed; /* counted since the last one logged */
};
int log_rate_ok(struct log_rate *r, uint64_t now_ms, uint64_t *suppressed);
/* " (N more since the last report)", or "" when N is 0. */
#define LOG_RATE_NOTE 64
const char *log_rate_note(uint64_t suppressed, char buf[LOG_RATE_NOTE]);

#define log_err(...)  log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...)                                                                             \
    do {                                                                                           \
        if (log_level_cur >= LOG_LVL_DEBUG)                                                        \
            log_msg(LOG_LVL_DEBUG, __VA_ARGS__);                                                   \
    } while (0)

#endif
