/* Prints the size and field offsets of every struct in rknn_standin.h, one per line:
 * "struct.field offset" and "struct sizeof N". tests/test_rknn_c.py compares them with the ctypes
 * Structures of rwkv2rknn/run/librknnrt.py and tests/standin/hooks.py. */
#include <stddef.h>
#include <stdio.h>

#include "rknn_standin.h"

typedef struct standin_tensor standin_tensor;
typedef struct standin_counters standin_counters;

#define SIZE(s) printf(#s " sizeof %zu\n", sizeof(s))
#define OFF(s, f) printf(#s "." #f " %zu\n", offsetof(s, f))

int main(void)
{
    SIZE(rknn_input_output_num);
    OFF(rknn_input_output_num, n_input); OFF(rknn_input_output_num, n_output);

    SIZE(rknn_tensor_attr);
    OFF(rknn_tensor_attr, index); OFF(rknn_tensor_attr, n_dims); OFF(rknn_tensor_attr, dims);
    OFF(rknn_tensor_attr, name); OFF(rknn_tensor_attr, n_elems); OFF(rknn_tensor_attr, size);
    OFF(rknn_tensor_attr, fmt); OFF(rknn_tensor_attr, type); OFF(rknn_tensor_attr, qnt_type);
    OFF(rknn_tensor_attr, fl); OFF(rknn_tensor_attr, zp); OFF(rknn_tensor_attr, scale);
    OFF(rknn_tensor_attr, w_stride); OFF(rknn_tensor_attr, size_with_stride);
    OFF(rknn_tensor_attr, pass_through); OFF(rknn_tensor_attr, h_stride);

    SIZE(rknn_perf_run);
    OFF(rknn_perf_run, run_duration);

    SIZE(rknn_sdk_version);
    OFF(rknn_sdk_version, api_version); OFF(rknn_sdk_version, drv_version);

    SIZE(rknn_mem_size);
    OFF(rknn_mem_size, total_weight_size); OFF(rknn_mem_size, total_internal_size);
    OFF(rknn_mem_size, total_dma_allocated_size); OFF(rknn_mem_size, total_sram_size);
    OFF(rknn_mem_size, free_sram_size); OFF(rknn_mem_size, reserved);

    SIZE(rknn_tensor_mem);
    OFF(rknn_tensor_mem, virt_addr); OFF(rknn_tensor_mem, phys_addr); OFF(rknn_tensor_mem, fd);
    OFF(rknn_tensor_mem, offset); OFF(rknn_tensor_mem, size); OFF(rknn_tensor_mem, flags);
    OFF(rknn_tensor_mem, priv_data);

    SIZE(rknn_input);
    OFF(rknn_input, index); OFF(rknn_input, buf); OFF(rknn_input, size); OFF(rknn_input, pass_through);
    OFF(rknn_input, type); OFF(rknn_input, fmt);

    SIZE(rknn_output);
    OFF(rknn_output, want_float); OFF(rknn_output, is_prealloc); OFF(rknn_output, index);
    OFF(rknn_output, buf); OFF(rknn_output, size);

    SIZE(standin_tensor);
    OFF(standin_tensor, name); OFF(standin_tensor, n_dims); OFF(standin_tensor, dims);
    OFF(standin_tensor, type); OFF(standin_tensor, fmt);

    SIZE(standin_counters);
    OFF(standin_counters, calls); OFF(standin_counters, allocs);
    OFF(standin_counters, alloc_bytes); OFF(standin_counters, input_copies);
    OFF(standin_counters, input_copy_bytes); OFF(standin_counters, output_copies);
    OFF(standin_counters, output_copy_bytes); OFF(standin_counters, conversions);
    OFF(standin_counters, converted_bytes); OFF(standin_counters, restrides);
    OFF(standin_counters, restride_bytes); OFF(standin_counters, runs);
    OFF(standin_counters, last_run_us); OFF(standin_counters, live_contexts);
    OFF(standin_counters, live_mems); OFF(standin_counters, last_core_mask);
    OFF(standin_counters, native_pad);
    return 0;
}
