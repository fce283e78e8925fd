"""wdjax.profiling: a profile's device time by kind of operation. The trace and HLO below are
written in the form jax.profiler and XLA produce on a GPU (no GPU runs here); the CPU path is
checked on real traces by test_train (log.profile_steps) and test_benchmarks (speed.py --trace)."""

import pytest

from wdjax import profiling as ps


# A step compiled for a GPU, in the form XLA prints it: a cuBLAS call (tuple-typed: its output
# and workspace), a Triton gemm fusion, the exact-GELU loop fusion (inside a command buffer, a
# CUDA graph XLA launches as one call), a weight cast, cuDNN attention, a reduction, a
# collective and a copy.
GPU_HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(bf16[8,16]{1,0})->bf16[8,32]{0,1}}

%region_0.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(f32[] %a, f32[] %b)
}

%fused_cast (param_0.2: f32[16,32]) -> bf16[16,32] {
  %param_0.2 = f32[16,32]{1,0} parameter(0)
  ROOT %convert.4 = bf16[16,32]{1,0} convert(f32[16,32]{1,0} %param_0.2)
}

%fused_gelu (param_0: bf16[8,32]) -> bf16[8,32] {
  %param_0 = bf16[8,32]{1,0} parameter(0)
  %convert.1 = f32[8,32]{1,0} convert(bf16[8,32]{1,0} %param_0)
  %erf.1 = f32[8,32]{1,0} erf(f32[8,32]{1,0} %convert.1)
  %multiply.1 = f32[8,32]{1,0} multiply(f32[8,32]{1,0} %convert.1, f32[8,32]{1,0} %erf.1)
  ROOT %convert.2 = bf16[8,32]{1,0} convert(f32[8,32]{1,0} %multiply.1)
}

%command_buffer (p.1: bf16[8,32]) -> bf16[8,32] {
  %p.1 = bf16[8,32]{1,0} parameter(0)
  ROOT %loop_multiply_fusion = bf16[8,32]{1,0} fusion(bf16[8,32]{1,0} %p.1), kind=kLoop, calls=%fused_gelu
}

%triton_gemm (p0: bf16[8,32], p1: bf16[32,32]) -> bf16[8,32] {
  %p0 = bf16[8,32]{1,0} parameter(0)
  %p1 = bf16[32,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,32]{1,0} dot(bf16[8,32]{1,0} %p0, bf16[32,32]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_reduce (param_0.1: bf16[8,32]) -> f32[8] {
  %param_0.1 = bf16[8,32]{1,0} parameter(0)
  %convert.3 = f32[8,32]{1,0} convert(bf16[8,32]{1,0} %param_0.1)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(f32[8,32]{1,0} %convert.3, f32[] %constant.1), dimensions={1}, to_apply=%region_0.1
}

ENTRY %main.9 (Arg_0.1: bf16[8,16], Arg_1.2: f32[16,32], Arg_2.3: bf16[32,32]) -> bf16[8,32] {
  %Arg_0.1 = bf16[8,16]{1,0} parameter(0)
  %Arg_1.2 = f32[16,32]{1,0} parameter(1)
  %Arg_2.3 = bf16[32,32]{1,0} parameter(2)
  %convert_fusion = bf16[16,32]{1,0} fusion(f32[16,32]{1,0} %Arg_1.2), kind=kLoop, calls=%fused_cast
  %custom-call.1 = (bf16[8,32]{1,0}, s8[4194304]{0}) custom-call(bf16[8,16]{1,0} %Arg_0.1, bf16[16,32]{1,0} %convert_fusion), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1}}
  %get-tuple-element.1 = bf16[8,32]{1,0} get-tuple-element((bf16[8,32]{1,0}, s8[4194304]{0}) %custom-call.1), index=0
  %call.7 = bf16[8,32]{1,0} call(bf16[8,32]{1,0} %get-tuple-element.1), to_apply=%command_buffer
  %gemm_fusion_dot.1 = bf16[8,32]{1,0} fusion(bf16[8,32]{1,0} %call.7, bf16[32,32]{1,0} %Arg_2.3), kind=kCustom, calls=%triton_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.2 = (bf16[1,8,2,16]{3,2,1,0}, u8[0]{0}) custom-call(bf16[8,32]{1,0} %gemm_fusion_dot.1), custom_call_target="__cudnn$fmhaSoftmax"
  %input_reduce_fusion = f32[8]{0} fusion(bf16[8,32]{1,0} %gemm_fusion_dot.1), kind=kInput, calls=%fused_reduce
  %all-reduce.1 = f32[8]{0} all-reduce(f32[8]{0} %input_reduce_fusion), replica_groups={}, to_apply=%region_0.1
  ROOT %copy.1 = bf16[8,32]{0,1} copy(bf16[8,32]{1,0} %gemm_fusion_dot.1)
}
"""


def _gpu_trace(steps: int) -> list[dict]:
  """A GPU profile as jax.profiler writes it: kernels on the device's stream line, most named by
  their `hlo_op` (two only by kernel name, which XLA derives from the fusion's; one by the command
  buffer's call it ran in, one by the command buffer's own name, as an H100 trace gave it), the derived `XLA Ops` line repeating them, host-side launch events,
  and another program's kernel."""
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  kernels = [("nvjet_tst_128x64", "custom-call.1", 40), ("loop_multiply_fusion", "call.7", 10),
             ("gemm_fusion_dot_1_impl", None, 30), ("cudnn_generated_fort_native_sdpa", "custom-call.2", 20),
             ("input_reduce_fusion", "input_reduce_fusion", 5), ("convert_fusion", "command_buffer_1", 3),
             ("ncclDevKernel_AllReduce_Sum_f32", "all-reduce.1", 8), ("copy_1", "copy.1", 2),
             ("unknown_kernel", None, 1)]
  events = list(meta)
  for step in range(steps):
    for name, op, dur in kernels:
      args = {"hlo_module": "jit_step"} | ({"hlo_op": op} if op else {})
      events.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "dur": dur, "args": args})
      events.append({"ph": "X", "pid": 1, "tid": 9, "name": op or name, "dur": dur, "args": args})
      if op:
        events.append({"ph": "X", "pid": 2, "tid": 3, "name": op, "dur": 4, "args": args})
    events.append({"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "dur": 100,
                   "args": {"hlo_module": "jit_other", "hlo_op": "loop_add_fusion"}})
  return events


def test_profile_summary_reads_a_gpu_step_by_kind_of_operation():
  hlo = ps.parse_hlo(GPU_HLO)
  want = {"convert_fusion": "copy", "custom-call.1": "matmul", "loop_multiply_fusion": "elementwise",
          "gemm_fusion_dot.1": "matmul", "custom-call.2": "attention", "input_reduce_fusion": "reduction",
          "all-reduce.1": "collective", "copy.1": "copy"}
  assert {k: hlo[k].category for k in want} == want
  assert hlo["loop_multiply_fusion"].detail == "kLoop: convert, erf, multiply"
  assert hlo["custom-call.1"].shape == "(bf16[8,32], s8[4194304])" and hlo["dot.1"].fused
  # launched: the cast, GELU, reduction and Triton gemm fusions and both library calls (the
  # tuple-typed custom calls included, the dot inside the gemm fusion not)
  assert ps.kernel_count(GPU_HLO) == 6

  steps = 3
  summary = ps.summarize(ps.jax_op_times(_gpu_trace(steps), "jit_step", hlo), steps, hlo)
  got = {k: round(v * 1e3, 6) for k, v in summary["categories"].items()}  # µs per step
  assert got == {"matmul": 70, "attention": 20, "elementwise": 10, "reduction": 5, "copy": 5,
                 "collective": 8, "other": 1}
  assert summary["device_ms"] == pytest.approx(0.119)
  assert summary["calls"] == 9  # kernels launched per step, the other program's left out
  assert [r["op"] for r in summary["top"][:2]] == ["custom-call.1", "gemm_fusion_dot_1_impl"]
  assert summary["top"][0]["calls"] == 1 and summary["top"][1]["shape"] == "bf16[8,32]"


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_TNT", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    ("triton_poi_fused_add_gelu_3", "elementwise"),
    ("triton_red_fused_native_layer_norm_0", "reduction"),
    ("triton_per_fused__softmax_1", "reduction"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wmma_f16_knob_3", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "reduction"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "elementwise"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
    ("aten::addmm", "matmul"), ("aten::maximum", "elementwise"), ("aten::max", "reduction"),
    ("aten::copy_", "copy"), ("Optimizer.step#AdamW.step", "other"),
])
def test_kernels_known_by_name_are_classified(name, category):
  assert ps.kernel_category(name) == category
