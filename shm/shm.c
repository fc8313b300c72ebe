/* The shared-memory segment: creation, layout and the accessors that are not inline. */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "shm/shm.h"

static size_t shm_align(size_t n)
{
    return (n + SHM_CACHELINE - 1) & ~(size_t)(SHM_CACHELINE - 1);
}

int shm_create(struct shm *shm, uint32_t n_backends, uint32_t n_workers, uint32_t generation)
{
    size_t off_backends, off_workers, off_wb, size;
    struct shm_header *hdr;
    void *base;
    int fd;

    if (n_workers == 0 || n_backends > 65536 || n_workers > 1024)
        return -EINVAL;
    off_backends = shm_align(sizeof(struct shm_header));
    off_workers = off_backends + shm_align(sizeof(struct shm_backend) * n_backends);
    off_wb = off_workers + shm_align(sizeof(struct shm_worker) * n_workers);
    size = off_wb + shm_align(sizeof(struct shm_wb) * n_backends * n_workers);

    /* Not MFD_CLOEXEC: a child that execs (none does today) could still map it by fd. */
    fd = memfd_create("aigw-shm", 0);
    if (fd == -1)
        return -errno;
    if (ftruncate(fd, (off_t)size) == -1) {
        int e = -errno;
        close(fd);
        return e;
    }
    base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int e = -errno;
        close(fd);
        return e;
    }
    /* ftruncate gives zeroed pages: every state starts at 0 (UP, READY, REASON_NONE). */
    hdr = base;
    hdr->magic = SHM_MAGIC;
    hdr->version = SHM_LAYOUT_VERSION;
    hdr->generation = generation;
    hdr->n_backends = n_backends;
    hdr->n_workers = n_workers;
    hdr->size = size;
    hdr->off_backends = off_backends;
    hdr->off_workers = off_workers;
    hdr->off_wb = off_wb;

    shm->base = base;
    shm->size = size;
    shm->fd = fd;
    shm->hdr = hdr;
    return 0;
}

void shm_destroy(struct shm *shm)
{
    if (shm->base)
        munmap(shm->base, shm->size);
    if (shm->fd >= 0)
        close(shm->fd);
    memset(shm, 0, sizeof(*shm));
    shm->fd = -1;
}

int shm_backend_eligible(const struct shm *shm, uint32_t b)
{
    const struct shm_backend *be = shm_backend(shm, b);

    return atomic_load_explicit(&be->state, memory_order_acquire) == BACKEND_UP &&
           atomic_load_explicit(&be->admin, memory_order_acquire) == BACKEND_READY &&
           atomic_load_explicit(&be->weight_eff, memory_order_relaxed) > 0;
}

void shm_backend_set_state(struct shm *shm, uint32_t b, enum backend_state st,
                           enum backend_reason why, uint64_t now_ns)
{
    struct shm_backend *be = shm_backend(shm, b);

    atomic_store_explicit(&be->reason, (uint32_t)why, memory_order_relaxed);
    atomic_store_explicit(&be->since_ns, now_ns, memory_order_relaxed);
    atomic_store_explicit(&be->transitions,
                          atomic_load_explicit(&be->transitions, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    /* Release: a reader that sees the new state also sees its reason and time. */
    atomic_store_explicit(&be->state, (uint32_t)st, memory_order_release);
}

void shm_backend_set_check(struct shm *shm, uint32_t b, int32_t status, uint32_t dur_us,
                           uint64_t now_ns)
{
    struct shm_backend *be = shm_backend(shm, b);

    atomic_store_explicit(&be->check_status, status, memory_order_relaxed);
    atomic_store_explicit(&be->check_us, dur_us, memory_order_relaxed);
    atomic_store_explicit(&be->check_at_ns, now_ns, memory_order_release);
}

void shm_backend_totals(const struct shm *shm, uint32_t b, struct shm_backend_totals *t)
{
    uint32_t w;

    memset(t, 0, sizeof(*t));
    for (w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);

        t->active += atomic_load_explicit(&wb->active, memory_order_relaxed);
        t->requests += atomic_load_explicit(&wb->requests, memory_order_relaxed);
        t->failures += atomic_load_explicit(&wb->failures, memory_order_relaxed);
        t->bytes_in += atomic_load_explicit(&wb->bytes_in, memory_order_relaxed);
        t->bytes_out += atomic_load_explicit(&wb->bytes_out, memory_order_relaxed);
    }
}

void shm_worker_reset(struct shm *shm, uint32_t w)
{
    struct shm_worker *sw = shm_worker(shm, w);
    uint32_t b;

    /* The dead worker's in-flight requests are gone with it: without this its share of
     * active connections would stay counted for ever. */
    for (b = 0; b < shm->hdr->n_backends; b++)
        atomic_store_explicit(&shm_wb(shm, w, b)->active, 0, memory_order_relaxed);
    atomic_store_explicit(&sw->conns, 0, memory_order_relaxed);
    atomic_store_explicit(&sw->pid, 0, memory_order_relaxed);
}

const char *shm_state_str(enum backend_state st)
{
    switch (st) {
    case BACKEND_UP:
        return "UP";
    case BACKEND_DOWN:
        return "DOWN";
    }
    return "?";
}

const char *shm_admin_str(enum backend_admin a)
{
    switch (a) {
    case BACKEND_READY:
        return "READY";
    case BACKEND_DRAIN:
        return "DRAIN";
    case BACKEND_MAINT:
        return "MAINT";
    }
    return "?";
}

const char *shm_reason_str(enum backend_reason r)
{
    static const char *const names[REASON_COUNT] = {
        [REASON_NONE] = "none",
        [REASON_CHECK_OK] = "check passed",
        [REASON_CHECK_STATUS] = "check status",
        [REASON_CHECK_TIMEOUT] = "check timeout",
        [REASON_CHECK_CONNECT] = "check connect failed",
        [REASON_CHECK_TLS] = "check TLS failed",
        [REASON_CHECK_PROTO] = "check bad response",
    };

    return (unsigned)r < REASON_COUNT ? names[r] : "?";
}
