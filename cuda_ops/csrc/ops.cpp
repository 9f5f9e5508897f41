// The petops operator library: the single TORCH_LIBRARY block (schemas only).
// Kernels: cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and cuda/*.cu (TORCH_LIBRARY_IMPL CUDA).
// Semantics: cuda_ops/petops/reference.py. Python loads this library with
// torch.ops.load_library (see cuda_ops/petops/__init__.py); there is no Python module.
#include <torch/library.h>

TORCH_LIBRARY(petops, m) {
  // Segmented bias + activation (+ per-task IA3 column scale): BitFit on the FFN up-proj.
  m.def(
      "bias_act(Tensor y, Tensor bias, Tensor seg_indptr, Tensor seg_bias, Tensor? scale, "
      "Tensor? seg_scale, int act) -> Tensor");
  // Segmented bias + residual + LayerNorm with per-task gamma/beta (BitFit / adapter LNs).
  m.def(
      "bias_residual_layernorm(Tensor y, Tensor? residual, Tensor? bias, Tensor gamma, "
      "Tensor beta, Tensor seg_indptr, Tensor? seg_bias, Tensor seg_ln, float eps) -> Tensor");
  // Grouped low-rank down-projection, mixed ranks (LoRA A, adapter down + act).
  m.def(
      "sgmv_shrink(Tensor x, Tensor w, Tensor seg_indptr, Tensor item_seg, Tensor item_w_off, "
      "Tensor item_rank, Tensor? bias, Tensor? item_b_off, int act, int max_rank) -> Tensor");
  // Grouped low-rank up-projection accumulated into y (LoRA B, adapter up).
  m.def(
      "sgmv_expand(Tensor(a!) y, Tensor tmp, Tensor w, Tensor seg_indptr, Tensor item_seg, "
      "Tensor item_w_off, Tensor item_rank, Tensor item_in_off, Tensor item_out_off, "
      "Tensor item_out_dim, Tensor item_scale, Tensor? bias, Tensor? item_b_off) -> ()");
  // Bottleneck adapter (down -> act -> up, per-segment task) + bias + residual + LayerNorm:
  // a whole adapter output site in one launch.
  m.def(
      "adapter_residual_layernorm(Tensor y, Tensor? residual, Tensor bias, Tensor seg_bias, "
      "Tensor w, Tensor seg_w_off, Tensor seg_rank, Tensor seg_act, Tensor gamma, Tensor beta, "
      "Tensor seg_indptr, Tensor seg_ln, int max_rank, float eps) -> Tensor");
  // Segmented sliced-ELL (32-row slices) sparse x dense accumulated into y (Diff-Pruning
  // deltas, MaskBERT index sets).
  m.def(
      "seg_spmm(Tensor(a!) y, Tensor x, Tensor seg_indptr, Tensor item_seg, "
      "Tensor item_slice_off, Tensor slice_ptr, Tensor indices, Tensor values) -> ()");
  // Segmented dense x bit-masked shared weight accumulated into y (MaskBERT, dense masks).
  m.def(
      "seg_masked_mm(Tensor(a!) y, Tensor x, Tensor seg_indptr, Tensor item_seg, "
      "Tensor item_mask_off, Tensor mask, Tensor dense_w, float alpha) -> ()");
}
