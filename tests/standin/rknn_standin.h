/* Our own declarations of the librknnrt C API (Rockchip RKNN runtime, SDK 2.x), written for the
 * stand-in library (librknnrt_standin.c) and the layout check (layout_check.c).
 *
 * Written from the documented API (shared/docs/rknn-runtime-api.md), not copied from the vendor's
 * rknn_api.h. The structs follow the documented field order; their types and array sizes were
 * compared field by field with rknn_api.h (SDK 2.x) as read from the search index, and the offsets
 * gcc gives them are checked against rwkv2rknn/run/librknnrt.py by tests/test_rknn_c.py.
 *
 * rknn_context is a uint64 on aarch64 and on x86_64 (where the tests run); only 32-bit ARM uses a
 * uint32. Enums are passed and stored as 4-byte ints (the LP64 ABIs of aarch64 and x86_64).
 */
#ifndef RKNN_STANDIN_H
#define RKNN_STANDIN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __arm__
typedef uint32_t rknn_context;
#else
typedef uint64_t rknn_context;
#endif

#define RKNN_MAX_DIMS 16
#define RKNN_MAX_NAME_LEN 256

/* Error codes (negative returns). */
#define RKNN_SUCC 0
#define RKNN_ERR_FAIL -1
#define RKNN_ERR_TIMEOUT -2
#define RKNN_ERR_DEVICE_UNAVAILABLE -3
#define RKNN_ERR_MALLOC_FAIL -4
#define RKNN_ERR_PARAM_INVALID -5
#define RKNN_ERR_MODEL_INVALID -6
#define RKNN_ERR_CTX_INVALID -7
#define RKNN_ERR_INPUT_INVALID -8
#define RKNN_ERR_OUTPUT_INVALID -9
#define RKNN_ERR_DEVICE_UNMATCH -10

/* rknn_init flags used by the project. */
#define RKNN_FLAG_COLLECT_PERF_MASK 0x8
#define RKNN_FLAG_DISABLE_FLUSH_INPUT_MEM_CACHE 0x4000
#define RKNN_FLAG_DISABLE_FLUSH_OUTPUT_MEM_CACHE 0x8000

typedef enum {
    RKNN_QUERY_IN_OUT_NUM = 0,
    RKNN_QUERY_INPUT_ATTR = 1,
    RKNN_QUERY_OUTPUT_ATTR = 2,
    RKNN_QUERY_PERF_DETAIL = 3,
    RKNN_QUERY_PERF_RUN = 4,
    RKNN_QUERY_SDK_VERSION = 5,
    RKNN_QUERY_MEM_SIZE = 6,
    RKNN_QUERY_NATIVE_INPUT_ATTR = 8,
    RKNN_QUERY_NATIVE_OUTPUT_ATTR = 9,
    RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR = 10,
    RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR = 11,
} rknn_query_cmd;

typedef enum {
    RKNN_TENSOR_FLOAT32 = 0,
    RKNN_TENSOR_FLOAT16 = 1,
    RKNN_TENSOR_INT8 = 2,
    RKNN_TENSOR_UINT8 = 3,
    RKNN_TENSOR_INT16 = 4,
    RKNN_TENSOR_UINT16 = 5,
    RKNN_TENSOR_INT32 = 6,
    RKNN_TENSOR_UINT32 = 7,
    RKNN_TENSOR_INT64 = 8,
    RKNN_TENSOR_BOOL = 9,
    RKNN_TENSOR_INT4 = 10,
    RKNN_TENSOR_BFLOAT16 = 11,
    RKNN_TENSOR_TYPE_MAX
} rknn_tensor_type;

typedef enum {
    RKNN_TENSOR_QNT_NONE = 0,
    RKNN_TENSOR_QNT_DFP = 1,
    RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC = 2,
} rknn_tensor_qnt_type;

typedef enum {
    RKNN_TENSOR_NCHW = 0,
    RKNN_TENSOR_NHWC = 1,
    RKNN_TENSOR_NC1HWC2 = 2,
    RKNN_TENSOR_UNDEFINED = 3,
} rknn_tensor_format;

typedef enum {
    RKNN_NPU_CORE_AUTO = 0,
    RKNN_NPU_CORE_0 = 1,
    RKNN_NPU_CORE_1 = 2,
    RKNN_NPU_CORE_2 = 4,
    RKNN_NPU_CORE_0_1 = 3,
    RKNN_NPU_CORE_0_1_2 = 7,
    RKNN_NPU_CORE_ALL = 0xffff,
} rknn_core_mask;

typedef enum {
    RKNN_MEMORY_SYNC_TO_DEVICE = 1,
    RKNN_MEMORY_SYNC_FROM_DEVICE = 2,
    RKNN_MEMORY_SYNC_BIDIRECTIONAL = 3,
} rknn_mem_sync_mode;

/* rknn_tensor_mem.flags: who owns the buffer. */
#define RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE 1
#define RKNN_TENSOR_MEMORY_FLAGS_FROM_FD 2

typedef struct {
    uint32_t n_input;
    uint32_t n_output;
} rknn_input_output_num;

typedef struct {
    uint32_t index;
    uint32_t n_dims;
    uint32_t dims[RKNN_MAX_DIMS];
    char name[RKNN_MAX_NAME_LEN];
    uint32_t n_elems;
    uint32_t size;               /* bytes in the plain layout */
    rknn_tensor_format fmt;
    rknn_tensor_type type;
    rknn_tensor_qnt_type qnt_type;
    int8_t fl;                   /* 3 bytes of padding follow */
    int32_t zp;
    float scale;
    uint32_t w_stride;
    uint32_t size_with_stride;   /* bytes in the native layout */
    uint8_t pass_through;        /* 3 bytes of padding follow */
    uint32_t h_stride;
} rknn_tensor_attr;

typedef struct {
    int64_t run_duration;        /* microseconds */
} rknn_perf_run;

typedef struct {
    char api_version[256];
    char drv_version[256];
} rknn_sdk_version;

typedef struct {
    uint32_t total_weight_size;
    uint32_t total_internal_size;
    uint64_t total_dma_allocated_size;
    uint32_t total_sram_size;
    uint32_t free_sram_size;
    uint32_t reserved[10];
} rknn_mem_size;

typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd;
    int32_t offset;
    uint32_t size;
    uint32_t flags;
    void *priv_data;
} rknn_tensor_mem;

typedef struct {
    uint32_t index;
    void *buf;
    uint32_t size;
    uint8_t pass_through;
    rknn_tensor_type type;
    rknn_tensor_format fmt;
} rknn_input;

typedef struct {
    uint8_t want_float;
    uint8_t is_prealloc;
    uint32_t index;
    void *buf;
    uint32_t size;
} rknn_output;

/* The extension structs are never filled by the project (it passes NULL): opaque here. */
typedef struct rknn_init_extend rknn_init_extend;
typedef struct rknn_run_extend rknn_run_extend;
typedef struct rknn_output_extend rknn_output_extend;

int rknn_init(rknn_context *ctx, void *model, uint32_t size, uint32_t flags, rknn_init_extend *extend);
int rknn_dup_context(rknn_context *ctx_in, rknn_context *ctx_out);
int rknn_destroy(rknn_context ctx);
int rknn_query(rknn_context ctx, rknn_query_cmd cmd, void *info, uint32_t size);
int rknn_set_core_mask(rknn_context ctx, rknn_core_mask mask);
int rknn_inputs_set(rknn_context ctx, uint32_t n_inputs, rknn_input inputs[]);
int rknn_run(rknn_context ctx, rknn_run_extend *extend);
int rknn_wait(rknn_context ctx, rknn_run_extend *extend);
int rknn_outputs_get(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *extend);
int rknn_outputs_release(rknn_context ctx, uint32_t n_outputs, rknn_output outputs[]);
rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size);
/* virt_addr is the CPU address of the fd's buffer WITHOUT the offset (as the vendor header says). */
rknn_tensor_mem *rknn_create_mem_from_fd(rknn_context ctx, int32_t fd, void *virt_addr, uint32_t size, int32_t offset);
int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem);
int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr);
int rknn_mem_sync(rknn_context ctx, rknn_tensor_mem *mem, rknn_mem_sync_mode mode);

/* ---- stand-in only: how tests describe and compute models, and what they read back ---- */

#define STANDIN_MAX_TENSORS 64

/* One model tensor as the test side describes it (the model's own dtype and plain shape). */
struct standin_tensor {
    char name[RKNN_MAX_NAME_LEN];
    uint32_t n_dims;
    uint32_t dims[RKNN_MAX_DIMS];
    int32_t type;                /* rknn_tensor_type; FLOAT16 for float tensors, as an fp16 build gives */
    int32_t fmt;                 /* rknn_tensor_format */
};

/* Fill the tensors of the model at `path`; return 0, or nonzero when the path is unknown. */
typedef int (*standin_describe_fn)(const char *path, uint32_t max_tensors, uint32_t *n_in,
                                   struct standin_tensor *ins, uint32_t *n_out, struct standin_tensor *outs);
/* Compute outputs from inputs, all contiguous, plain layout, in the model's dtypes; return 0 on success. */
typedef int (*standin_compute_fn)(const char *path, uint32_t n_in, void *const *ins, uint32_t n_out, void *const *outs);

/* Calls counted per function, in this order; standin_function_name(i) gives the C name. */
enum standin_function {
    SF_INIT, SF_DESTROY, SF_QUERY, SF_SET_CORE_MASK, SF_DUP_CONTEXT, SF_INPUTS_SET, SF_RUN, SF_WAIT,
    SF_OUTPUTS_GET, SF_OUTPUTS_RELEASE, SF_CREATE_MEM, SF_CREATE_MEM_FROM_FD, SF_SET_IO_MEM,
    SF_MEM_SYNC, SF_DESTROY_MEM, STANDIN_N_FUNCTIONS
};

struct standin_counters {
    uint64_t calls[STANDIN_N_FUNCTIONS];
    uint64_t allocs, alloc_bytes;                /* memory the runtime allocated (mems, staging, scratch, outputs_get) */
    uint64_t input_copies, input_copy_bytes;     /* inputs_set copies, and conversions of bound inputs */
    uint64_t output_copies, output_copy_bytes;   /* outputs_get copies, and conversions of bound outputs */
    uint64_t conversions, converted_bytes;       /* dtype or layout conversions (also counted as copies) */
    uint64_t restrides, restride_bytes;          /* padded pass-through buffers unpadded for the callback: the
                                                    NPU reads them natively, so no board cost (not copies) */
    uint64_t runs;
    int64_t last_run_us;
    uint64_t live_contexts, live_mems;           /* state, kept by standin_reset_counters */
    uint32_t last_core_mask;
    uint32_t native_pad;                         /* the padding new contexts get (standin_set_native_pad) */
};

void standin_set_hooks(standin_describe_fn describe, standin_compute_fn compute);
void standin_get_counters(struct standin_counters *out);
void standin_reset_counters(void);
int standin_n_functions(void);
const char *standin_function_name(int i);
/* Make the next `times` calls (times < 0: every call, 0: none) of `function` return `code`
 * (NULL for the create_mem functions). function NULL clears every failure. Returns 0, or -1 for an unknown name. */
int standin_set_fail(const char *function, int code, int times);
/* Native layouts of contexts opened from now on: 0 plain, n > 0 pads each tensor's last dimension up to
 * a multiple of n elements (size_with_stride > size), n < 0 (the default) reads env STANDIN_NATIVE_PAD. */
void standin_set_native_pad(int64_t elems);
/* Sleep this many microseconds inside every rknn_run; us < 0 (the default) reads env STANDIN_RUN_US. */
void standin_set_run_us(int64_t us);
/* The core mask a context was given, or -1 for an unknown context. */
int64_t standin_core_mask(rknn_context ctx);

#ifdef __cplusplus
}
#endif

#endif
