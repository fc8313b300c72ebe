/* placeholder until the worker lands: lets the master link and be tested */
#include <unistd.h>
#include "core/worker.h"
int worker_main(struct conf *conf, struct shm *shm, int slot, const int *listen_fds)
{
    for (;;)
        pause();
}
