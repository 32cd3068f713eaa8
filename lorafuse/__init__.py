"""lorafuse: LoRA fine-tuning on fused Triton kernels.

`lorafuse.kernels` holds the ops (fused LoRA matmul, linear cross-entropy, varlen attention, ...);
`lorafuse.engine` holds data, model patching, LoRA, the training loop and the CLI.
"""

__version__ = "0.1.0"
