/* placeholder until the health checker lands: lets the master link and be tested */
#include <unistd.h>
#include "health/health.h"
int health_main(struct conf *conf, struct shm *shm)
{
    for (;;)
        pause();
}
