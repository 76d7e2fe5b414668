"""torch.compile's artifacts carried between processes: the key they are valid under, and
torch's own serialisation of them (the "mega-cache").

A compiled encoder costs its first process minutes (dynamo's trace, AOT autograd, inductor's
code generation and the C++ / Triton compile); `save_artifacts` serialises what inductor and
AOT autograd produced in this process, `load_artifacts` puts such bytes back into this
process's inductor caches before it compiles, so that compile finds every graph there
(inductor's `fxgraph_cache_hit`) instead of lowering and generating it. Dynamo still traces
(seconds). On CUDA the Triton kernels travel inside the FX-graph entries; on CPU inductor's
C++ kernels do not (they are built again unless inductor's own cache folder is still there).

The bytes are only valid for the same torch, Triton and device kind, and only useful for
the same graphs: `cache_key` folds all of that into one name. Where the bytes are kept
(a folder, a URL) is the caller's business; this module never touches storage.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

KEY_VERSION = 1  # bump when what goes into the key changes meaning


def triton_version() -> str | None:
    """Triton's version where it is installed (it builds the CUDA kernels), else None."""
    try:
        import triton
    except Exception:  # not installed, or a broken install: nothing compiled by it to match
        return None
    return str(getattr(triton, "__version__", "unknown"))


def device_kind(device: torch.device | str) -> str:
    """What compiled code is specific to: the GPU's name on CUDA ("cuda:NVIDIA H100 80GB HBM3"),
    else the CPU's architecture and the vector ISA inductor generates code for ("cpu:x86_64:AVX2")."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"


@dataclass(frozen=True)
class CacheKey:
    """Everything a compiled model's artifacts depend on. `settings`: the speed settings in
    effect (EncoderSpeed as a dict), `version`: the persam release (its modules are traced)."""

    model_type: str
    settings: dict[str, Any]
    device: str
    version: str
    torch: str = torch.__version__
    triton: str | None = None
    python: str = platform.python_version()

    def name(self) -> str:
        """A file-name-safe digest of the whole key (model type first, for people listing the cache)."""
        text = json.dumps({"key_version": KEY_VERSION, **asdict(self)}, sort_keys=True)
        return f"{self.model_type}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def cache_key(model_type: str, settings: Any, device: torch.device | str, version: str) -> CacheKey:
    """The key for `model_type` compiled under `settings` (a dataclass such as EncoderSpeed) on `device`."""
    values = asdict(settings) if hasattr(settings, "__dataclass_fields__") else dict(settings)
    return CacheKey(model_type=model_type, settings=values, device=device_kind(device), version=version,
                    triton=triton_version())


def load_artifacts(blob: bytes) -> int:
    """Put serialised artifacts into this process's compile caches -> how many were loaded
    (0: none usable). Raises on bytes torch cannot read; callers treat that as a cold start."""
    info = torch.compiler.load_cache_artifacts(blob)
    if info is None:
        return 0
    return sum(len(keys) for keys in info.artifacts.values())


def save_artifacts() -> bytes | None:
    """Every artifact this process's compiles produced so far, serialised; None when there are none."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    blob, info = saved
    return blob if any(info.artifacts.values()) else None


def compile_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process so far: a miss is a graph
    inductor generated and built here, a hit one it found ready."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"hit": int(inductor.get("fxgraph_cache_hit", 0)), "miss": int(inductor.get("fxgraph_cache_miss", 0))}
