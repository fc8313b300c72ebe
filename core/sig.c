/* Signal dispositions shared by the master and its children (see sig.h for who does what). */
#include "core/sig.h"

#include <signal.h>
#include <stddef.h>

#include "core/util.h"

/* Nobody acts on these: ignored so that none of them is fatal. */
static const int sig_unused[] = {SIGPIPE,   SIGALRM, SIGTTIN, SIGTTOU,   SIGXFSZ,
                                 SIGVTALRM, SIGPROF, SIGPWR,  SIGSTKFLT, SIGIO};
/* The master acts on these; children ignore them (a worker handles USR1 from the master once
 * its access log is set up). */
static const int sig_master_only[] = {SIGHUP, SIGUSR1, SIGUSR2};
/* Every process stops on these with a handler of its own. */
static const int sig_stop[] = {SIGTERM, SIGINT, SIGQUIT};

static void sig_set(const int *sigs, size_t n, void (*how)(int))
{
    for (size_t i = 0; i < n; i++)
        signal(sigs[i], how);
}

static void sig_mask(const int *sigs, size_t n, int how)
{
    sigset_t set;

    sigemptyset(&set);
    for (size_t i = 0; i < n; i++)
        sigaddset(&set, sigs[i]);
    sigprocmask(how, &set, NULL);
}

void sig_ignore_unused(int child)
{
    sig_set(sig_unused, ARRAY_SIZE(sig_unused), SIG_IGN);
    if (child)
        sig_set(sig_master_only, ARRAY_SIZE(sig_master_only), SIG_IGN);
}

void sig_child_after_fork(void)
{
    sigset_t stop;

    signal(SIGCHLD, SIG_DFL);
    sig_set(sig_stop, ARRAY_SIZE(sig_stop), SIG_DFL);
    sig_ignore_unused(1);
    /* The fork happened with every signal blocked: in one step, keep only the stop signals
     * blocked (a TERM already pending stays pending for the child's own handler). */
    sigemptyset(&stop);
    for (size_t i = 0; i < ARRAY_SIZE(sig_stop); i++)
        sigaddset(&stop, sig_stop[i]);
    sigprocmask(SIG_SETMASK, &stop, NULL);
}

void sig_child_ready(void)
{
    sig_mask(sig_stop, ARRAY_SIZE(sig_stop), SIG_UNBLOCK);
}

void sig_block_all_handled(void)
{
    sig_mask(sig_stop, ARRAY_SIZE(sig_stop), SIG_BLOCK);
    sig_mask(sig_master_only, ARRAY_SIZE(sig_master_only), SIG_BLOCK);
}
