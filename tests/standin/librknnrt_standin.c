/* A stand-in for Rockchip's librknnrt.so, so the ctypes binding (rwkv2rknn/run/librknnrt.py) can be
 * tested on a PC. It exports the same C functions; a "model" is whatever the test side's describe and
 * compute callbacks say it is (standin_set_hooks). It counts what a real runtime would spend: calls,
 * allocations, copies and dtype/layout conversions, so tests can show the zero-copy path copies nothing.
 *
 * Not modelled: quantization, fmt transposes (NCHW/NHWC are taken as given), rknn_init from a buffer,
 * asynchronous runs, cache coherence (rknn_mem_sync only checks its arguments), and the real native
 * layouts (a forced padding of the last dimension stands in for them; see standin_set_native_pad).
 */
#define _GNU_SOURCE
#include "rknn_standin.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONTEXTS 1024
#define MAX_FDS 4096
#define MEM_MAGIC 0x5354414e44494e4dULL

/* ---------------------------------------------------------------- global state */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static standin_describe_fn g_describe;
static standin_compute_fn g_compute;
static struct standin_counters g_count;
static int64_t g_pad = -1;      /* -1: read STANDIN_NATIVE_PAD */
static int64_t g_run_us = -1;   /* -1: read STANDIN_RUN_US */
static int g_next_fd = 1000;

static const char *const g_names[STANDIN_N_FUNCTIONS] = {
    "rknn_init", "rknn_destroy", "rknn_query", "rknn_set_core_mask", "rknn_dup_context",
    "rknn_inputs_set", "rknn_run", "rknn_wait", "rknn_outputs_get", "rknn_outputs_release",
    "rknn_create_mem", "rknn_create_mem_from_fd", "rknn_set_io_mem", "rknn_mem_sync", "rknn_destroy_mem",
};
static struct { int code, times; } g_fail[STANDIN_N_FUNCTIONS];

#define ADD(field, v) __atomic_fetch_add(&g_count.field, (uint64_t)(v), __ATOMIC_RELAXED)

/* Count the call; return the injected failure code, or 0. */
static int enter(int fn)
{
    ADD(calls[fn], 1);
    int code = 0;
    pthread_mutex_lock(&g_lock);
    if (g_fail[fn].times != 0) {
        code = g_fail[fn].code;
        if (g_fail[fn].times > 0)
            g_fail[fn].times--;
    }
    pthread_mutex_unlock(&g_lock);
    return code;
}

static void *alloc_counted(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 1) != 0)
        return NULL;
    memset(p, 0, n);
    ADD(allocs, 1);
    ADD(alloc_bytes, n);
    return p;
}

static int64_t env_or(int64_t set, const char *name)
{
    if (set >= 0)
        return set;
    const char *v = getenv(name);
    return v ? atoll(v) : 0;
}

/* ---------------------------------------------------------------- dtypes */

static uint32_t elem_bytes(int type)
{
    switch (type) {
    case RKNN_TENSOR_FLOAT32: case RKNN_TENSOR_INT32: case RKNN_TENSOR_UINT32: return 4;
    case RKNN_TENSOR_FLOAT16: case RKNN_TENSOR_INT16: case RKNN_TENSOR_UINT16: case RKNN_TENSOR_BFLOAT16: return 2;
    case RKNN_TENSOR_INT64: return 8;
    default: return 1;  /* int8, uint8, bool; int4 is refused at rknn_init */
    }
}

static uint16_t f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000)                       /* inf, nan */
        return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
    if (ax >= 0x477ff000)                       /* rounds past 65504 */
        return (uint16_t)(sign | 0x7c00);
    if (ax < 0x38800000) {                      /* fp16 subnormal or zero: count units of 2^-24 */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
    }
    uint32_t h = (ax - 0x38000000) >> 13, rest = ax & 0x1fff;   /* rebias 127 -> 15 */
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))           /* round half to even */
        h++;
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, x;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    x = sign | (e == 31 ? 0x7f800000 | (m << 13) : ((e + 112) << 23) | (m << 13));
    memcpy(&f, &x, 4);
    return f;
}

static int convertible(int from, int to)
{
    return from == to || ((from == RKNN_TENSOR_FLOAT32 || from == RKNN_TENSOR_FLOAT16) &&
                          (to == RKNN_TENSOR_FLOAT32 || to == RKNN_TENSOR_FLOAT16));
}

/* n elements from type `from` to type `to` (convertible() must hold). */
static void convert(void *dst, int to, const void *src, int from, size_t n)
{
    if (from == to) {
        memcpy(dst, src, n * elem_bytes(to));
    } else if (from == RKNN_TENSOR_FLOAT32) {
        for (size_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = f32_to_f16(((const float *)src)[i]);
    } else {
        for (size_t i = 0; i < n; i++)
            ((float *)dst)[i] = f16_to_f32(((const uint16_t *)src)[i]);
    }
}

/* ---------------------------------------------------------------- models and contexts */

struct tensor {
    struct standin_tensor spec;
    uint32_t index, n_elems, size;
    uint32_t rows, width, stride;   /* plain rows of `width` elements; native rows `stride` apart */
    uint32_t size_with_stride;
};

struct model {
    char path[4096];
    uint32_t n_in, n_out;
    struct tensor in[STANDIN_MAX_TENSORS], out[STANDIN_MAX_TENSORS];
    int refs;
};

struct binding {
    rknn_tensor_mem *mem;   /* NULL: not bound */
    int pass_through, type;
    int convert;            /* the runtime converts dtype or layout between mem and the model */
    int restride;           /* pass-through in a padded native layout: unpadded for the callback */
    void *scratch;          /* plain model-dtype bytes when mem does not hold them */
};

struct context {
    struct model *m;
    uint32_t core_mask;
    int64_t last_run_us;
    struct binding bin[STANDIN_MAX_TENSORS], bout[STANDIN_MAX_TENSORS];
    void *staged[STANDIN_MAX_TENSORS];   /* copying path: inputs as the model reads them */
    void *result[STANDIN_MAX_TENSORS];   /* outputs the run wrote outside any bound mem */
    void *last_out[STANDIN_MAX_TENSORS]; /* where the last run's plain outputs are */
    int ran;
};

struct mem_rec {            /* what rknn_tensor_mem.priv_data points at */
    uint64_t magic;
    void *data;             /* first byte the model sees (fd base + offset) */
    int owns;
};

static struct context *g_ctx[MAX_CONTEXTS];
static struct { int fd; char *base; uint32_t size; } g_fds[MAX_FDS];

static struct context *lookup(rknn_context h)
{
    struct context *c = NULL;
    pthread_mutex_lock(&g_lock);
    if (h >= 1 && h <= MAX_CONTEXTS)
        c = g_ctx[h - 1];
    pthread_mutex_unlock(&g_lock);
    return c;
}

static int add_context(struct context *c, rknn_context *out)
{
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_CONTEXTS; i++) {
        if (!g_ctx[i]) {
            g_ctx[i] = c;
            c->m->refs++;
            pthread_mutex_unlock(&g_lock);
            *out = (rknn_context)(i + 1);
            ADD(live_contexts, 1);
            return RKNN_SUCC;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return RKNN_ERR_MALLOC_FAIL;
}

static struct mem_rec *rec_of(rknn_tensor_mem *mem)
{
    struct mem_rec *r = mem ? (struct mem_rec *)mem->priv_data : NULL;
    return r && r->magic == MEM_MAGIC ? r : NULL;
}

static int fill_tensor(struct tensor *t, const struct standin_tensor *s, uint32_t index, uint32_t pad)
{
    if (s->n_dims > RKNN_MAX_DIMS || s->type < 0 || s->type >= RKNN_TENSOR_TYPE_MAX || s->type == RKNN_TENSOR_INT4)
        return -1;
    t->spec = *s;
    t->spec.name[RKNN_MAX_NAME_LEN - 1] = 0;
    t->index = index;
    t->n_elems = 1;
    for (uint32_t d = 0; d < s->n_dims; d++)
        t->n_elems *= s->dims[d];
    t->width = s->n_dims ? s->dims[s->n_dims - 1] : 1;
    t->rows = t->width ? t->n_elems / t->width : 0;
    t->stride = pad ? (t->width + pad - 1) / pad * pad : t->width;
    t->size = t->n_elems * elem_bytes(s->type);
    t->size_with_stride = t->rows * t->stride * elem_bytes(s->type);
    return 0;
}

/* Copy rows between a plain layout (row length width) and a strided one. */
static void restride(char *dst, uint32_t dst_stride, const char *src, uint32_t src_stride, const struct tensor *t)
{
    uint32_t eb = elem_bytes(t->spec.type);
    for (uint32_t r = 0; r < t->rows; r++)
        memcpy(dst + (size_t)r * dst_stride * eb, src + (size_t)r * src_stride * eb, (size_t)t->width * eb);
}

static int padded(const struct tensor *t) { return t->size_with_stride > t->size; }

/* ---------------------------------------------------------------- lifecycle */

int rknn_init(rknn_context *ctx, void *model, uint32_t size, uint32_t flags, rknn_init_extend *extend)
{
    (void)flags; (void)extend;
    int code = enter(SF_INIT);
    if (code) return code;
    if (!ctx || !model) return RKNN_ERR_PARAM_INVALID;
    if (size != 0 || !g_describe || !g_compute) return RKNN_ERR_MODEL_INVALID;  /* paths only; needs hooks */
    struct model *m = calloc(1, sizeof *m);
    struct standin_tensor *ins = calloc(2 * STANDIN_MAX_TENSORS, sizeof *ins), *outs = ins + STANDIN_MAX_TENSORS;
    struct context *c = calloc(1, sizeof *c);
    code = RKNN_ERR_MODEL_INVALID;
    if (!m || !ins || !c) { code = RKNN_ERR_MALLOC_FAIL; goto fail; }
    snprintf(m->path, sizeof m->path, "%s", (const char *)model);
    if (g_describe(m->path, STANDIN_MAX_TENSORS, &m->n_in, ins, &m->n_out, outs) != 0) goto fail;
    if (m->n_in > STANDIN_MAX_TENSORS || m->n_out > STANDIN_MAX_TENSORS) goto fail;
    uint32_t pad = (uint32_t)env_or(g_pad, "STANDIN_NATIVE_PAD");
    for (uint32_t i = 0; i < m->n_in; i++)
        if (fill_tensor(&m->in[i], &ins[i], i, pad)) goto fail;
    for (uint32_t i = 0; i < m->n_out; i++)
        if (fill_tensor(&m->out[i], &outs[i], i, pad)) goto fail;
    free(ins);
    c->m = m;
    code = add_context(c, ctx);
    if (code == RKNN_SUCC) return code;
    ins = NULL;
fail:
    free(ins); free(m); free(c);
    return code;
}

int rknn_dup_context(rknn_context *ctx_in, rknn_context *ctx_out)
{
    int code = enter(SF_DUP_CONTEXT);
    if (code) return code;
    struct context *src = ctx_in ? lookup(*ctx_in) : NULL;
    if (!src || !ctx_out) return RKNN_ERR_CTX_INVALID;
    struct context *c = calloc(1, sizeof *c);
    if (!c) return RKNN_ERR_MALLOC_FAIL;
    c->m = src->m;
    c->core_mask = src->core_mask;
    code = add_context(c, ctx_out);
    if (code) free(c);
    return code;
}

int rknn_destroy(rknn_context ctx)
{
    int code = enter(SF_DESTROY);
    if (code) return code;
    struct context *c = NULL;
    int last = 0;
    pthread_mutex_lock(&g_lock);
    if (ctx >= 1 && ctx <= MAX_CONTEXTS && (c = g_ctx[ctx - 1])) {
        g_ctx[ctx - 1] = NULL;
        last = --c->m->refs == 0;
    }
    pthread_mutex_unlock(&g_lock);
    if (!c) return RKNN_ERR_CTX_INVALID;
    for (int i = 0; i < STANDIN_MAX_TENSORS; i++) {
        free(c->bin[i].scratch); free(c->bout[i].scratch); free(c->staged[i]); free(c->result[i]);
    }
    if (last) free(c->m);
    free(c);
    __atomic_fetch_sub(&g_count.live_contexts, 1, __ATOMIC_RELAXED);
    return RKNN_SUCC;
}

int rknn_set_core_mask(rknn_context ctx, rknn_core_mask mask)
{
    int code = enter(SF_SET_CORE_MASK);
    if (code) return code;
    struct context *c = lookup(ctx);
    if (!c) return RKNN_ERR_CTX_INVALID;
    if (mask != 0 && mask != 1 && mask != 2 && mask != 4 && mask != 3 && mask != 7 && mask != 0xffff)
        return RKNN_ERR_PARAM_INVALID;
    c->core_mask = (uint32_t)mask;
    g_count.last_core_mask = (uint32_t)mask;
    return RKNN_SUCC;
}

/* ---------------------------------------------------------------- queries */

static void fill_attr(rknn_tensor_attr *a, const struct tensor *t, int native)
{
    memset(a, 0, sizeof *a);
    a->index = t->index;
    a->n_dims = t->spec.n_dims;
    memcpy(a->dims, t->spec.dims, sizeof a->dims);
    memcpy(a->name, t->spec.name, RKNN_MAX_NAME_LEN);
    a->n_elems = t->n_elems;
    a->size = t->size;
    a->fmt = (rknn_tensor_format)t->spec.fmt;
    a->type = (rknn_tensor_type)t->spec.type;
    a->qnt_type = RKNN_TENSOR_QNT_NONE;
    a->scale = 1.0f;
    a->w_stride = native ? t->stride : 0;
    a->size_with_stride = native ? t->size_with_stride : t->size;
}

int rknn_query(rknn_context ctx, rknn_query_cmd cmd, void *info, uint32_t size)
{
    int code = enter(SF_QUERY);
    if (code) return code;
    struct context *c = lookup(ctx);
    if (!c) return RKNN_ERR_CTX_INVALID;
    if (!info) return RKNN_ERR_PARAM_INVALID;
    struct model *m = c->m;
    switch (cmd) {
    case RKNN_QUERY_IN_OUT_NUM: {
        if (size < sizeof(rknn_input_output_num)) return RKNN_ERR_PARAM_INVALID;
        rknn_input_output_num *n = info;
        n->n_input = m->n_in;
        n->n_output = m->n_out;
        return RKNN_SUCC;
    }
    case RKNN_QUERY_INPUT_ATTR: case RKNN_QUERY_OUTPUT_ATTR:
    case RKNN_QUERY_NATIVE_INPUT_ATTR: case RKNN_QUERY_NATIVE_OUTPUT_ATTR:
    case RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR: case RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR: {
        if (size < sizeof(rknn_tensor_attr)) return RKNN_ERR_PARAM_INVALID;
        rknn_tensor_attr *a = info;
        int is_in = cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_NATIVE_INPUT_ATTR ||
                    cmd == RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR;
        uint32_t n = is_in ? m->n_in : m->n_out;
        if (a->index >= n) return RKNN_ERR_PARAM_INVALID;
        fill_attr(a, is_in ? &m->in[a->index] : &m->out[a->index], cmd >= RKNN_QUERY_NATIVE_INPUT_ATTR);
        return RKNN_SUCC;
    }
    case RKNN_QUERY_PERF_RUN:
        if (size < sizeof(rknn_perf_run)) return RKNN_ERR_PARAM_INVALID;
        ((rknn_perf_run *)info)->run_duration = c->last_run_us;
        return RKNN_SUCC;
    case RKNN_QUERY_SDK_VERSION: {
        if (size < sizeof(rknn_sdk_version)) return RKNN_ERR_PARAM_INVALID;
        rknn_sdk_version *v = info;
        snprintf(v->api_version, sizeof v->api_version, "standin (not librknnrt)");
        snprintf(v->drv_version, sizeof v->drv_version, "standin");
        return RKNN_SUCC;
    }
    case RKNN_QUERY_MEM_SIZE:
        if (size < sizeof(rknn_mem_size)) return RKNN_ERR_PARAM_INVALID;
        memset(info, 0, sizeof(rknn_mem_size));
        return RKNN_SUCC;
    default:
        return RKNN_ERR_PARAM_INVALID;
    }
}

/* ---------------------------------------------------------------- zero-copy memory */

static rknn_tensor_mem *new_mem(void *data, int fd, uint32_t size, int32_t offset, uint32_t flags, int owns)
{
    rknn_tensor_mem *mem = calloc(1, sizeof *mem);
    struct mem_rec *r = calloc(1, sizeof *r);
    if (!mem || !r) { free(mem); free(r); return NULL; }
    *r = (struct mem_rec){MEM_MAGIC, data, owns};
    mem->virt_addr = data;
    mem->phys_addr = (uint64_t)(uintptr_t)data;
    mem->fd = fd;
    mem->offset = offset;
    mem->size = size;
    mem->flags = flags;
    mem->priv_data = r;
    ADD(live_mems, 1);
    return mem;
}

rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size)
{
    if (enter(SF_CREATE_MEM) || !lookup(ctx) || size == 0) return NULL;
    pthread_mutex_lock(&g_lock);
    int slot = -1;
    for (int i = 0; i < MAX_FDS && slot < 0; i++)
        if (!g_fds[i].base) slot = i;
    int fd = g_next_fd++;
    pthread_mutex_unlock(&g_lock);
    if (slot < 0) return NULL;
    char *data = alloc_counted(size);
    rknn_tensor_mem *mem = data ? new_mem(data, fd, size, 0, RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE, 1) : NULL;
    if (!mem) { free(data); return NULL; }
    pthread_mutex_lock(&g_lock);
    g_fds[slot].fd = fd; g_fds[slot].base = data; g_fds[slot].size = size;
    pthread_mutex_unlock(&g_lock);
    return mem;
}

rknn_tensor_mem *rknn_create_mem_from_fd(rknn_context ctx, int32_t fd, void *virt_addr, uint32_t size, int32_t offset)
{
    if (enter(SF_CREATE_MEM_FROM_FD) || !lookup(ctx)) return NULL;
    char *base = NULL;
    uint32_t total = 0;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_FDS; i++)
        if (g_fds[i].base && g_fds[i].fd == fd) { base = g_fds[i].base; total = g_fds[i].size; }
    pthread_mutex_unlock(&g_lock);
    if (!base) {
        fprintf(stderr, "librknnrt standin: rknn_create_mem_from_fd: unknown fd %d\n", fd);
        return NULL;
    }
    if (virt_addr != base) {
        fprintf(stderr, "librknnrt standin: rknn_create_mem_from_fd: virt_addr must be the buffer's base "
                        "address, without the offset\n");
        return NULL;
    }
    if (offset < 0 || size == 0 || (uint64_t)offset + size > total) {
        fprintf(stderr, "librknnrt standin: rknn_create_mem_from_fd: offset %d + size %u exceeds the %u-byte "
                        "buffer\n", offset, size, total);
        return NULL;
    }
    return new_mem(base + offset, fd, size, offset, RKNN_TENSOR_MEMORY_FLAGS_FROM_FD, 0);
}

static void unbind(struct binding *b)
{
    free(b->scratch);
    memset(b, 0, sizeof *b);
}

int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem)
{
    int code = enter(SF_DESTROY_MEM);
    if (code) return code;
    struct context *c = lookup(ctx);
    struct mem_rec *r = rec_of(mem);
    if (!c) return RKNN_ERR_CTX_INVALID;
    if (!r) return RKNN_ERR_PARAM_INVALID;
    for (int i = 0; i < STANDIN_MAX_TENSORS; i++) {   /* no dangling binding in this context */
        if (c->bin[i].mem == mem) unbind(&c->bin[i]);
        if (c->bout[i].mem == mem) unbind(&c->bout[i]);
    }
    if (r->owns) {
        pthread_mutex_lock(&g_lock);
        for (int i = 0; i < MAX_FDS; i++)
            if (g_fds[i].base == r->data) g_fds[i].base = NULL;
        pthread_mutex_unlock(&g_lock);
        free(r->data);
    }
    r->magic = 0;
    free(r);
    free(mem);
    __atomic_fetch_sub(&g_count.live_mems, 1, __ATOMIC_RELAXED);
    return RKNN_SUCC;
}

/* The tensor an attr names: found by name (input and output indexes overlap), checked by index. */
static const struct tensor *find_tensor(struct model *m, const rknn_tensor_attr *a, int *is_in)
{
    for (int pass = 0; pass < 2; pass++) {
        uint32_t n = pass ? m->n_out : m->n_in;
        const struct tensor *ts = pass ? m->out : m->in;
        for (uint32_t i = 0; i < n; i++) {
            if (strncmp(ts[i].spec.name, a->name, RKNN_MAX_NAME_LEN) == 0 && a->index == i) {
                *is_in = !pass;
                return &ts[i];
            }
        }
    }
    return NULL;
}

int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr)
{
    int code = enter(SF_SET_IO_MEM);
    if (code) return code;
    struct context *c = lookup(ctx);
    if (!c) return RKNN_ERR_CTX_INVALID;
    int is_in = 0;
    const struct tensor *t = attr ? find_tensor(c->m, attr, &is_in) : NULL;
    if (!rec_of(mem) || !t) return RKNN_ERR_PARAM_INVALID;
    int native = t->spec.type;
    struct binding b = {mem, attr->pass_through != 0, attr->pass_through ? native : (int)attr->type, 0, 0, NULL};
    if (b.pass_through) {
        if ((int)attr->type != native || mem->size < t->size_with_stride) return RKNN_ERR_PARAM_INVALID;
        b.restride = padded(t);
    } else {
        if (!convertible(b.type, native) || mem->size < (uint64_t)t->n_elems * elem_bytes(b.type))
            return RKNN_ERR_PARAM_INVALID;
        b.convert = b.type != native || padded(t);
    }
    if (b.convert || b.restride) {
        b.scratch = alloc_counted(t->size);
        if (!b.scratch) return RKNN_ERR_MALLOC_FAIL;
    }
    struct binding *slot = is_in ? &c->bin[t->index] : &c->bout[t->index];
    unbind(slot);
    *slot = b;
    return RKNN_SUCC;
}

int rknn_mem_sync(rknn_context ctx, rknn_tensor_mem *mem, rknn_mem_sync_mode mode)
{
    int code = enter(SF_MEM_SYNC);
    if (code) return code;
    if (!lookup(ctx)) return RKNN_ERR_CTX_INVALID;
    if (!rec_of(mem) || mode < 1 || mode > 3) return RKNN_ERR_PARAM_INVALID;
    return RKNN_SUCC;
}

/* ---------------------------------------------------------------- the copying path */

int rknn_inputs_set(rknn_context ctx, uint32_t n_inputs, rknn_input inputs[])
{
    int code = enter(SF_INPUTS_SET);
    if (code) return code;
    struct context *c = lookup(ctx);
    if (!c) return RKNN_ERR_CTX_INVALID;
    if (!inputs && n_inputs) return RKNN_ERR_PARAM_INVALID;
    for (uint32_t k = 0; k < n_inputs; k++) {
        rknn_input *in = &inputs[k];
        if (in->index >= c->m->n_in || !in->buf) return RKNN_ERR_INPUT_INVALID;
        const struct tensor *t = &c->m->in[in->index];
        int native = t->spec.type, type = in->pass_through ? native : (int)in->type;
        uint64_t need = in->pass_through ? t->size_with_stride : (uint64_t)t->n_elems * elem_bytes(type);
        if (in->size < need || !convertible(type, native)) return RKNN_ERR_INPUT_INVALID;
        if (!c->staged[in->index] && !(c->staged[in->index] = alloc_counted(t->size))) return RKNN_ERR_MALLOC_FAIL;
        void *dst = c->staged[in->index];
        if (in->pass_through && padded(t)) {
            restride(dst, t->width, in->buf, t->stride, t);
        } else if (!in->pass_through && (type != native || padded(t))) {
            convert(dst, native, in->buf, type, t->n_elems);
            ADD(conversions, 1);
            ADD(converted_bytes, t->size);
        } else {
            memcpy(dst, in->buf, t->size);
        }
        unbind(&c->bin[in->index]);   /* the copied data wins over an earlier binding */
        ADD(input_copies, 1);
        ADD(input_copy_bytes, t->size);
    }
    return RKNN_SUCC;
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int rknn_run(rknn_context ctx, rknn_run_extend *extend)
{
    (void)extend;
    int code = enter(SF_RUN);
    if (code) return code;
    struct context *c = lookup(ctx);
    if (!c) return RKNN_ERR_CTX_INVALID;
    if (!g_compute) return RKNN_ERR_MODEL_INVALID;
    struct model *m = c->m;
    void *ins[STANDIN_MAX_TENSORS], *outs[STANDIN_MAX_TENSORS];
    int64_t t0 = now_us();
    for (uint32_t i = 0; i < m->n_in; i++) {
        const struct tensor *t = &m->in[i];
        struct binding *b = &c->bin[i];
        if (!b->mem) {
            if (!c->staged[i]) return RKNN_ERR_INPUT_INVALID;   /* neither set nor bound */
            ins[i] = c->staged[i];
            continue;
        }
        void *data = rec_of(b->mem)->data;
        if (b->convert) {
            /* the same dtype in a padded native layout is a conversion too: the runtime pads it */
            convert(b->scratch, t->spec.type, data, b->type, t->n_elems);
            ADD(conversions, 1); ADD(converted_bytes, t->size);
            ADD(input_copies, 1); ADD(input_copy_bytes, t->size);
            ins[i] = b->scratch;
        } else if (b->restride) {
            restride(b->scratch, t->width, data, t->stride, t);
            ADD(restrides, 1); ADD(restride_bytes, t->size);
            ins[i] = b->scratch;
        } else {
            ins[i] = data;
        }
    }
    for (uint32_t i = 0; i < m->n_out; i++) {
        struct binding *b = &c->bout[i];
        if (b->mem && !b->convert && !b->restride) {
            outs[i] = rec_of(b->mem)->data;
        } else if (b->mem) {
            outs[i] = b->scratch;
        } else {
            if (!c->result[i] && !(c->result[i] = alloc_counted(m->out[i].size))) return RKNN_ERR_MALLOC_FAIL;
            outs[i] = c->result[i];
        }
        c->last_out[i] = outs[i];
    }
    int64_t sleep_us = env_or(g_run_us, "STANDIN_RUN_US");
    if (sleep_us > 0) usleep((useconds_t)sleep_us);
    if (g_compute(m->path, m->n_in, ins, m->n_out, outs) != 0) return RKNN_ERR_FAIL;
    for (uint32_t i = 0; i < m->n_out; i++) {
        const struct tensor *t = &m->out[i];
        struct binding *b = &c->bout[i];
        if (b->mem && b->convert) {
            convert(rec_of(b->mem)->data, b->type, b->scratch, t->spec.type, t->n_elems);
            ADD(conversions, 1); ADD(converted_bytes, (uint64_t)t->n_elems * elem_bytes(b->type));
            ADD(output_copies, 1); ADD(output_copy_bytes, (uint64_t)t->n_elems * elem_bytes(b->type));
        } else if (b->mem && b->restride) {
            restride(rec_of(b->mem)->data, t->stride, b->scratch, t->width, t);
            ADD(restrides, 1); ADD(restride_bytes, t->size);
        }
    }
    c->ran = 1;
    c->last_run_us = now_us() - t0;
    g_count.last_run_us = c->last_run_us;
    ADD(runs, 1);
    return RKNN_SUCC;
}

int rknn_wait(rknn_context ctx, rknn_run_extend *extend)
{
    (void)extend;
    int code = enter(SF_WAIT);
    if (code) return code;
    return lookup(ctx) ? RKNN_SUCC : RKNN_ERR_CTX_INVALID;
}

int rknn_outputs_get(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *extend)
{
    (void)extend;
    int code = enter(SF_OUTPUTS_GET);
    if (code) return code;
    struct context *c = lookup(ctx);
    if (!c) return RKNN_ERR_CTX_INVALID;
    if (!c->ran || (!outputs && n_outputs)) return RKNN_ERR_OUTPUT_INVALID;
    for (uint32_t k = 0; k < n_outputs; k++) {
        rknn_output *o = &outputs[k];
        if (o->index >= c->m->n_out) return RKNN_ERR_OUTPUT_INVALID;
        const struct tensor *t = &c->m->out[o->index];
        int from = t->spec.type, to = o->want_float && convertible(from, RKNN_TENSOR_FLOAT32) ? RKNN_TENSOR_FLOAT32 : from;
        uint32_t need = t->n_elems * elem_bytes(to);
        if (o->is_prealloc) {
            if (!o->buf || o->size < need) return RKNN_ERR_OUTPUT_INVALID;
        } else {
            if (!(o->buf = alloc_counted(need))) return RKNN_ERR_MALLOC_FAIL;
            o->size = need;
        }
        convert(o->buf, to, c->last_out[o->index], from, t->n_elems);
        if (to != from) { ADD(conversions, 1); ADD(converted_bytes, need); }
        ADD(output_copies, 1);
        ADD(output_copy_bytes, need);
    }
    return RKNN_SUCC;
}

int rknn_outputs_release(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[])
{
    int code = enter(SF_OUTPUTS_RELEASE);
    if (code) return code;
    if (!lookup(ctx)) return RKNN_ERR_CTX_INVALID;
    for (uint32_t k = 0; outputs && k < n_outputs; k++) {
        if (!outputs[k].is_prealloc) {
            free(outputs[k].buf);
            outputs[k].buf = NULL;
        }
    }
    return RKNN_SUCC;
}

/* ---------------------------------------------------------------- stand-in controls */

void standin_set_hooks(standin_describe_fn describe, standin_compute_fn compute)
{
    pthread_mutex_lock(&g_lock);
    g_describe = describe;
    g_compute = compute;
    pthread_mutex_unlock(&g_lock);
}

void standin_get_counters(struct standin_counters *out)
{
    *out = g_count;
    out->native_pad = (uint32_t)env_or(g_pad, "STANDIN_NATIVE_PAD");
}

void standin_reset_counters(void)
{
    uint64_t contexts = g_count.live_contexts, mems = g_count.live_mems;
    memset(&g_count, 0, sizeof g_count);
    g_count.live_contexts = contexts;
    g_count.live_mems = mems;
}

int standin_n_functions(void) { return STANDIN_N_FUNCTIONS; }

const char *standin_function_name(int i) { return i >= 0 && i < STANDIN_N_FUNCTIONS ? g_names[i] : NULL; }

int standin_set_fail(const char *function, int code, int times)
{
    pthread_mutex_lock(&g_lock);
    int found = -1;
    for (int i = 0; i < STANDIN_N_FUNCTIONS; i++) {
        if (!function || strcmp(function, g_names[i]) == 0) {
            g_fail[i].code = function ? code : 0;
            g_fail[i].times = function ? times : 0;
            found = 0;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return found;
}

void standin_set_native_pad(int64_t elems) { g_pad = elems; }

void standin_set_run_us(int64_t us) { g_run_us = us; }

int64_t standin_core_mask(rknn_context ctx)
{
    struct context *c = lookup(ctx);
    return c ? (int64_t)c->core_mask : -1;
}
