"""CPU machinery: process settings (freed memory kept, denormals flushed, torch's OpenMP runtime found) and
bf16 training with fp32 master weights, whose optimizer loops are C (``master_weights.c``) compiled on first
use."""

from aaekit.cpu.runtime import keep_freed_memory, openmp_runtimes, set_flush_denormals, slow_bf16_reason

__all__ = ["keep_freed_memory", "openmp_runtimes", "set_flush_denormals", "slow_bf16_reason"]
