"""Model FLOPs utilisation (MFU): nanoGPT's FLOPs-per-token estimate over the device's peak.

FLOPs per token = 6·N + 12·L·H·Q·T (PaLM appendix B, as in nanoGPT's `estimate_mfu`):
6·N for the forward and backward matmuls of N weights, plus the attention scores and
weighted sums over T positions in L layers of H heads of width Q.
"""
import functools
import logging
import re
import time

import torch
from torch import nn

log = logging.getLogger(__name__)

# Dense peaks per precision from NVIDIA's data sheets (no sparsity), in FLOP/s: fp32 on the CUDA
# cores, tf32, bf16 and fp16 on the tensor cores (fp16 and bf16 accumulating in fp32, as PyTorch
# runs them). Matched against torch.cuda.get_device_name(), first match wins. A precision a GPU
# has no tensor cores for (a V100's tf32 and bf16) is missing: tf32 falls back to fp32, bf16 is
# measured (emulated).
_H100_SXM = {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
_H100_NVL = {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12}
GPU_PEAK_FLOPS = (
    (r"H100 PCIe", {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12}),
    (r"H[12]00 NVL", _H100_NVL),
    (r"H100", _H100_SXM),  # "NVIDIA H100 80GB HBM3": the SXM part
    (r"H200", _H100_SXM),
    (r"A100", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}),  # SXM and PCIe alike
    (r"\bL4\b", {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12}),
    (r"\bA10\b", {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12}),
    (r"RTX 4090", {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12, "fp16": 165.2e12}),
    (r"V100S", {"fp32": 16.4e12, "fp16": 130e12}),
    (r"V100-PCIE", {"fp32": 14e12, "fp16": 112e12}),
    (r"V100", {"fp32": 15.7e12, "fp16": 125e12}),  # SXM2
)


def gpu_peak(name: str, precision: str) -> float | None:
    """The data-sheet peak of the GPU called `name` for matmuls in `precision` (fp32, tf32, bf16, fp16)."""
    for pattern, peaks in GPU_PEAK_FLOPS:
        if re.search(pattern, name):
            return peaks.get(precision, peaks["fp32"] if precision == "tf32" else None)
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def matmul_params(model: nn.Module) -> int:
    """Unique parameters that take part in matmuls: all but embedding tables that are only looked up.

    The token embedding counts when it is tied to the LM head, as in nanoGPT; the
    position embedding never does.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_id = id(head.weight) if head is not None else None
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - {head_id}
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for i, p in unique.items() if i not in lookups)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    c = model.config  # Hugging Face configs map GPT-2's n_layer/n_head/n_embd onto these names
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return flops_per_token(matmul_params(model), c.num_hidden_layers, c.num_attention_heads, head_dim, seq_len)


@functools.cache
def measured_matmul_flops(device_type: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                          budget_s: float = 0.3) -> float:
    """Best FLOP/s of an n×n matmul within about `budget_s`, measured once per process.

    The best, not the mean: other processes sharing the machine only ever slow it down.
    """
    # A private generator: the global RNG stream, which dropout and sampling draw from, is untouched.
    g = torch.Generator(device_type).manual_seed(0)
    a, b = (torch.randn(n, n, device=device_type, dtype=dtype, generator=g) for _ in range(2))
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool, allocator, kernel selection
    sync()
    best, start = 0.0, time.perf_counter()
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
        if time.perf_counter() - start > budget_s:
            return best


# The matmul whose peak MFU divides by, for each mixed precision ("no": fp32, or tf32 where on).
MATMUL_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_flops(device: torch.device, configured: float | None = None, precision: str = "no") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from), for matmuls in `precision`,
    the run's mixed precision. A CPU with native bf16 (AVX512-BF16, AMX) multiplies several
    times faster in it, so a measured peak is measured in the dtype the run uses."""
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"trainer.peak_flops={configured}: give the FLOP/s of one device, e.g. 989e12")
        return float(configured), "trainer.peak_flops"
    dtype = MATMUL_DTYPES[precision]
    what = f"measured {str(dtype).removeprefix('torch.')} matmul"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "tf32" if torch.backends.cuda.matmul.allow_tf32
                                                     else "fp32")
        flops = gpu_peak(name, kind)
        if flops is not None:
            return flops, f"{name} data sheet ({kind} dense)"
        log.warning("no %s peak FLOP/s known for %s; %s instead (set trainer.peak_flops to override)", kind, name,
                    what)
        return measured_matmul_flops("cuda", dtype), f"{what} on {name}"
    return measured_matmul_flops(device.type, dtype), f"{what} on {device.type}"


class MFU:
    """tokens/s -> model FLOPs utilisation, for `num_processes` devices of equal peak."""

    def __init__(self, model: nn.Module, seq_len: int, device: torch.device, num_processes: int = 1,
                 configured_peak: float | None = None, precision: str = "no"):
        self.flops_per_token = model_flops_per_token(model, seq_len)
        self.peak, self.source = peak_flops(device, configured_peak, precision)
        self.total_peak = self.peak * num_processes
        log.info("MFU: %.3g FLOPs per token; peak %.3g FLOP/s per device (%s)",
                 self.flops_per_token, self.peak, self.source)

    def __call__(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.total_peak
