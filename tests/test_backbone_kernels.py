"""The kernel-kind table and FLOP count behind ``clients.bench.backbone_kernels``."""

from __future__ import annotations

import pytest

from clients.bench.backbone_kernels import forward_flops, kind_of
from pets.backbone import load_backbone


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_TNN", "gemm"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
        ("void petops::sgmv_shrink_tc_kernel<__half>(...)", "pet"),
        ("void petops::bias_act_kernel<__half, 1>(...)", "epilogue"),
        ("void petops::adapter_ln_rows_kernel<__half>(...)", "layernorm"),
        ("void petops::bias_residual_layernorm_vec_kernel<__half>(...)", "layernorm"),
        (
            "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>",
            "layernorm",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
            "epilogue",
        ),
        (
            "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
            "layout",
        ),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kind_of(name: str, kind: str) -> None:
    assert kind_of(name) == kind


def test_forward_flops_bert_base() -> None:
    """bert-base at 256 x 64 tokens is 2.82 TFLOP of matrix products (issue 23's figure)."""
    spec = load_backbone("bert-base").spec
    assert forward_flops(spec, 256, 64) / 1e12 == pytest.approx(2.82, abs=0.01)
    # Doubling the batch doubles the work; doubling the length more than doubles it.
    assert forward_flops(spec, 512, 64) == pytest.approx(2 * forward_flops(spec, 256, 64))
    assert forward_flops(spec, 256, 128) > 2 * forward_flops(spec, 256, 64)
