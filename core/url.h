/* Backend URL parsing: http[s]://host[:port][/prefix]. */
#ifndef AIGW_CORE_URL_H
#define AIGW_CORE_URL_H

#include "core/conf.h"

/* Parses s into u. Returns 0 or -EINVAL with *why set to a static reason. Accepts IPv6
 * literals in brackets; rejects userinfo, query and fragment; trailing '/' is removed. */
int url_parse(const char *s, struct url *u, const char **why);

#endif
