/* Logging to stderr: "2026-11-26T05:54:12.345Z aigw[pid] role: level: message". */
#ifndef AIGW_CORE_LOG_H
#define AIGW_CORE_LOG_H

#include "core/conf.h"

void log_init(const char *role, enum log_level level);
void log_set_role(const char *role);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

extern enum log_level log_level_cur;

#define log_err(...)  log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...)                                                                             \
    do {                                                                                           \
        if (log_level_cur >= LOG_LVL_DEBUG)                                                        \
            log_msg(LOG_LVL_DEBUG, __VA_ARGS__);                                                   \
    } while (0)

#endif
