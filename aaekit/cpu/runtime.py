"""Process-wide settings the trainer applies when it trains on a CPU. Each was found by measuring the paper's
MNIST setting (784-1000-1000 nets, batch 100) and is explained in the README's benchmark section."""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from pathlib import Path


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed blocks back to the kernel. By default blocks over 128 KiB are mapped
    on allocation and unmapped on free, so every step's activations and bf16 weight copies come back as fresh
    pages: ~1,100 page faults per bf16 step on the paper's MNIST setting (~6 % of its time on a CPU). With
    these thresholds blocks up to 32 MiB are reused within the process. Returns whether it applied (glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def openmp_runtimes() -> list[Path]:
    """The OpenMP runtimes this process has loaded (libgomp, or an LLVM/Intel one: all export the GOMP_ entry
    points): torch's own copy where its wheel brings one, else every one loaded (a build that links the
    system's)."""
    import torch

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return []
    paths = sorted(
        {line.split()[-1] for line in maps.splitlines() if re.search(r"/lib(gomp|omp|iomp5)[^/]*\.so", line)}
    )
    torch_dir = str(Path(torch.__file__).parent)
    return [Path(p) for p in ([p for p in paths if p.startswith(torch_dir)] or paths)]


def _openmp_libraries() -> list[ctypes.CDLL]:
    libraries = []
    for path in openmp_runtimes():
        try:
            library = ctypes.CDLL(str(path))  # the loaded copy: dlopen of a loaded path returns it
            library.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        except (OSError, AttributeError):
            continue
        libraries.append(library)
    return libraries


def set_flush_denormals(on: bool) -> int:
    """Flush denormal numbers (below ~1.2e-38 in fp32 and bf16) to zero on every thread that computes for
    torch.

    Adam's running averages of units whose gradients have gone to zero decay geometrically through the
    denormal range, and a CPU handles denormals by a slow path: on the paper's MNIST setting about 1 % of
    Adam's state was denormal after 240 steps and the fp32 step had slowed from 26 to 29-38 ms (23-25 ms with
    flushing). The flag lives in each thread's floating-point control register and torch.set_flush_denormal
    sets only the calling thread, so it is also set inside one parallel region of torch's OpenMP pool, whose
    worker threads exist as soon as any parallel operator has run. Returns how many threads now have it (0:
    this CPU has no such mode)."""
    import torch

    if not torch.set_flush_denormal(on):
        return 0
    threads = torch.get_num_threads()
    reached: set[int] = {threading.get_native_id()}

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def on_each_thread(_):  # ctypes takes the GIL for each call
        torch.set_flush_denormal(on)
        reached.add(threading.get_native_id())

    for openmp in _openmp_libraries() if threads > 1 else []:
        openmp.GOMP_parallel(ctypes.cast(on_each_thread, ctypes.c_void_p), None, threads, 0)
    return len(reached)


def slow_bf16_reason() -> str | None:
    """Why bf16 matrix products are slow on this CPU, or None where they are fast. oneDNN computes bf16 well
    only with AVX-512 (natively with AVX-512 BF16 or AMX); with AVX2 alone it converts every operand, and bf16
    trains several times slower than fp32 (measured 61 against 373 samples/s on `semisupervised_1000.toml`,
    one thread, an AMD EPYC with AVX2 only, 2026-12-02)."""
    import torch

    try:
        fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 either
        fast = False
    if fast:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch finds {capability} and no AVX-512 on this CPU"
