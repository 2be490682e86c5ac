/* A cache of large CPU blocks for convexmix's outputs (private; see alloc.py).
 *
 * A fresh large tensor costs its page faults and the kernel zeroing every page: on a
 * virtual machine, many times the cost of writing memory the process already has, and
 * more than the whole memory-bound cost of a small convex combination (figures in
 * docs/benchmarks.md). So freed outputs come back here instead of to the OS, and the
 * next output of the same size reuses one, like the CUDA caching allocator does.
 *
 * Blocks are handed to torch as DLPack tensors (torch.from_dlpack): torch calls
 * cx_pool_release when the last tensor sharing the storage dies, so a block is reused
 * only once nothing can see it. Sizes are rounded up to 2 MiB, blocks are 2 MiB
 * aligned and advised onto transparent huge pages, and a request takes the smallest
 * cached block that fits with at most a quarter to spare. At most `cap` bytes stay cached;
 * beyond that, the least recently freed blocks go back to the OS.
 *
 *   cx_pool_acquire(nbytes)  a DLManagedTensor of nbytes uint8, or NULL (out of memory)
 *   cx_pool_discard(t)       gives back a tensor torch never took
 *   cx_pool_set_cap(bytes)   the cache's limit; 0 frees everything cached
 *   cx_pool_cached()         bytes cached now
 *   cx_pool_empty()          unmaps every cached block (the cap stays)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

/* DLPack (v0.8) structures, as torch.from_dlpack reads them. */
typedef struct {
    int32_t device_type;
    int32_t device_id;
} DLDevice;
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

#define HUGE (2u << 20)

typedef struct Block {
    void *data;
    size_t size;
    struct Block *next; /* in the cache: the next more recently freed block */
} Block;

typedef struct {
    DLManagedTensor managed;
    int64_t shape[1];
    Block *block;
} Lease;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Block *oldest = NULL, *newest = NULL; /* freed blocks, least recent first */
static size_t cached = 0, cap = 0;

static void reset_lock(void) { pthread_mutex_init(&lock, NULL); }

__attribute__((constructor)) static void on_load(void) { pthread_atfork(NULL, NULL, reset_lock); }

static void drop(Block *b) {
    munmap(b->data, b->size);
    free(b);
}

/* `size` bytes (a multiple of HUGE) of fresh pages at a HUGE-aligned address, or NULL:
 * maps HUGE more and unmaps the unaligned head and tail. */
static void *map_aligned(size_t size) {
    char *p = (char *)mmap(NULL, size + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
    if (p == (char *)MAP_FAILED) return NULL;
    const size_t head = (HUGE - (uintptr_t)p % HUGE) % HUGE;
    if (head) munmap(p, head);
    if (HUGE - head) munmap(p + head + size, HUGE - head);
    return p + head;
}

/* Unlinks and returns the cached blocks beyond the cap (caller holds the lock). */
static Block *trim_locked(void) {
    Block *out = NULL;
    while (oldest && cached > cap) {
        Block *b = oldest;
        oldest = b->next;
        if (!oldest) newest = NULL;
        cached -= b->size;
        b->next = out;
        out = b;
    }
    return out;
}

static void drop_all(Block *b) {
    while (b) {
        Block *next = b->next;
        drop(b);
        b = next;
    }
}

static void release(DLManagedTensor *self) {
    Lease *lease = (Lease *)self;
    Block *b = lease->block;
    free(lease);
    pthread_mutex_lock(&lock);
    b->next = NULL;
    if (newest) newest->next = b;
    else oldest = b;
    newest = b;
    cached += b->size;
    Block *excess = trim_locked();
    pthread_mutex_unlock(&lock);
    drop_all(excess); /* free() outside the lock */
}

/* The smallest cached block that holds `size` with at most a quarter to spare (outputs
 * of varying shapes reuse blocks instead of piling up new ones), or a new block. */
static Block *take(size_t size) {
    const size_t most = size + size / 4;
    pthread_mutex_lock(&lock);
    Block *prev = NULL, *b = NULL;
    for (Block *p = NULL, *c = oldest; c; p = c, c = c->next) {
        if (c->size >= size && c->size <= most && (!b || c->size < b->size)) {
            prev = p;
            b = c;
        }
    }
    if (b) {
        if (prev) prev->next = b->next;
        else oldest = b->next;
        if (newest == b) newest = prev;
        cached -= b->size;
    }
    pthread_mutex_unlock(&lock);
    if (b) return b;
    b = (Block *)malloc(sizeof *b);
    if (!b) return NULL;
    b->size = size;
    b->data = map_aligned(size);
    if (!b->data) {
        free(b);
        return NULL;
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(b->data, size, MADV_HUGEPAGE); /* advice: a failure changes nothing */
#endif
    return b;
}

DLManagedTensor *cx_pool_acquire(int64_t nbytes) {
    if (nbytes <= 0) return NULL;
    size_t size = ((size_t)nbytes + HUGE - 1) / HUGE * HUGE;
    Lease *lease = (Lease *)calloc(1, sizeof *lease);
    if (!lease) return NULL;
    Block *b = take(size);
    if (!b) {
        free(lease);
        return NULL;
    }
    lease->block = b;
    lease->shape[0] = nbytes;
    DLTensor *t = &lease->managed.dl_tensor;
    t->data = b->data;
    t->device.device_type = 1; /* kDLCPU */
    t->ndim = 1;
    t->dtype.code = 1; /* kDLUInt */
    t->dtype.bits = 8;
    t->dtype.lanes = 1;
    t->shape = lease->shape;
    t->strides = NULL; /* compact */
    lease->managed.deleter = release;
    return &lease->managed;
}

void cx_pool_discard(DLManagedTensor *t) { t->deleter(t); }

void cx_pool_set_cap(int64_t bytes) {
    pthread_mutex_lock(&lock);
    cap = bytes > 0 ? (size_t)bytes : 0;
    Block *excess = trim_locked();
    pthread_mutex_unlock(&lock);
    drop_all(excess);
}

int64_t cx_pool_cached(void) {
    pthread_mutex_lock(&lock);
    int64_t n = (int64_t)cached;
    pthread_mutex_unlock(&lock);
    return n;
}

void cx_pool_empty(void) {
    pthread_mutex_lock(&lock);
    Block *all = oldest;
    oldest = newest = NULL;
    cached = 0;
    pthread_mutex_unlock(&lock);
    drop_all(all);
}
