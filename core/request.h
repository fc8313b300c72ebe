/* The validate stage of a client request: what RFC 9112/9110 allow in a request line and head
 * beyond what llhttp checks. Pure functions over the parsed spans, no I/O. */
#ifndef AIGW_CORE_REQUEST_H
#define AIGW_CORE_REQUEST_H

#include <stddef.h>

/* The methods aigw serves, OPTIONS by itself and the others by forwarding: the Allow header of
 * a 405 and of the answer to OPTIONS. */
#define REQUEST_ALLOW "GET, POST, DELETE, HEAD, OPTIONS"

/* Request-target forms (RFC 9112 3.2). */
enum request_target {
    REQUEST_TARGET_ORIGIN = 0,   /* "/v1/models?x=1" */
    REQUEST_TARGET_ABSOLUTE = 1, /* "http://host/v1/models": forwarded by its path and query */
    REQUEST_TARGET_ASTERISK = 2, /* "*": OPTIONS only */
};

/* Classifies a request-target. For origin and absolute form *path / *path_len is what the
 * upstream gets: the target itself, or the absolute form from its path on ("" or "?q" when it
 * has no path; RFC 9112 3.2.2: its authority, not Host, names the target, and aigw sends the
 * backend's Host either way). -EINVAL for authority form (CONNECT's, never served), any other
 * shape, a scheme other than http/https, an empty or invalid authority, a userinfo
 * (RFC 9110 4.2.4) and any byte a request-target cannot hold: controls, space, DEL, non-ASCII
 * and '#' (a fragment is never sent). */
int request_target(const char *t, size_t len, const char **path, size_t *path_len);

/* 1 when p[0, len) is a non-empty token (RFC 9110 5.6.2), as header names and methods must be:
 * no space (so no white space before a header's colon), no separator, no control byte. */
int request_token(const char *p, size_t len);

/* 1 when v[0, len) is a valid Host value: uri-host [":" port] (RFC 9110 7.2), a reg-name,
 * IPv4 address or bracketed IP literal; empty is allowed (RFC 9112 3.2: a target without an
 * authority). */
int request_host_ok(const char *v, size_t len);

/* For bytes llhttp refused as a method: 1 when they start a request line with an extension
 * method (a token, then a space: 501 Not Implemented rather than 400), 0 when they cannot,
 * -EAGAIN when the token has not ended yet in p[0, len). Leading empty lines are skipped as
 * llhttp skips them. */
int request_ext_method(const char *p, size_t len);

/* 1 when the 8 bytes before end are a well-formed HTTP-version ("HTTP/" DIGIT "." DIGIT),
 * begin being where the request starts: llhttp refused a version it does not know (505)
 * rather than a malformed one (400). */
int request_version_form(const char *begin, const char *end);

#endif
