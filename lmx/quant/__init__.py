"""lmx.quant: weight-only quantization (int8, int4, NF4) for QLoRA and inference."""

from lmx.quant.weights import (KINDS, NF4_CODE, QTensor, bits_per_param, dequantize, nbytes,
                               quantize, quantized_matmul)

__all__ = ["KINDS", "NF4_CODE", "QTensor", "bits_per_param", "dequantize", "nbytes", "quantize",
           "quantized_matmul"]
