"""lorafuse kernels: the public, stable API (../shared/DESIGN.md).

Each op dispatches per call on its tensors' device: Triton on CUDA, Triton's interpreter on CPU
when TRITON_INTERPRET=1 was set before triton was imported, the PyTorch reference otherwise
(or always with LORAFUSE_KERNELS=reference).
"""

# From the repository root (the current directory on sys.path) this folder is also importable
# as a top-level `kernels`, the name of a PyPI project that transformers probes for; stay inert
# under that name so the probe finds nothing and nothing is imported twice.
if __name__ == "lorafuse.kernels":
    from .fused_linear_cross_entropy import fused_linear_cross_entropy
    from .lora_linear import lora_linear, lora_linear_group, lora_mlp
    from .rms_norm import rms_norm, rms_norm_branch, rms_norm_residual
    from .rope import apply_rope
    from .swiglu import geglu, swiglu
    from .varlen_attention import varlen_attention

    __all__ = ["lora_linear", "lora_linear_group", "lora_mlp", "fused_linear_cross_entropy", "varlen_attention",
               "apply_rope", "rms_norm", "rms_norm_branch", "rms_norm_residual", "swiglu", "geglu"]
