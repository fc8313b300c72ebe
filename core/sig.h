/* Signal dispositions shared by the master and its children, so that no signal an operator
 * may send (to one process or to the whole group, as a terminal does) kills a process by
 * accident. Who acts on what:
 *   TERM, QUIT   graceful stop (every process)      INT          fast stop (every process)
 *   HUP, USR2    the master's (reload, upgrade); the children ignore them unless a worker
 *                installs a handler of its own
 *   USR1         the master forwards it to the workers, which reopen the access log file
 *                (core/alog.c installs their handler; until then they ignore it)
 *   PIPE, ALRM, TTIN, TTOU, XFSZ  ignored everywhere (a broken pipe is an EPIPE, a write to a
 *                terminal from the background or past a file-size limit fails instead of
 *                stopping or killing the process)
 *   TSTP, STOP, CONT  left to job control: ^Z suspends, SIGCONT resumes, nothing dies. */
#ifndef AIGW_CORE_SIG_H
#define AIGW_CORE_SIG_H

/* Ignores the signals nobody acts on; with `child` also HUP, USR1 and USR2. */
void sig_ignore_unused(int child);

/* In a child right after fork, once the master's signal handlers are gone: the dispositions
 * above, with TERM, INT and QUIT kept blocked until the child's own handlers are in place
 * (sig_child_ready), so that a stop request arriving meanwhile waits instead of being lost
 * or killing the child halfway through its start. */
void sig_child_after_fork(void);

/* Unblocks TERM, INT and QUIT: call once their handlers are installed. */
void sig_child_ready(void);

/* Blocks every signal the master acts on, for its last steps (its handlers are being torn
 * down: a second Ctrl-C must not kill it before it removed its admin socket). */
void sig_block_all_handled(void);

#endif
