"""The job spec: every setting of one `persam` run, built once from the command line.

`JobSpec.from_args` builds it from argparse's namespace *by field name*, so the parser's
`dest` names are the spec's field names; the parser takes its defaults from here. The spec
is frozen and handed whole to every stage and actor: adding an option means the parser
(its flag and help), a field here and the code that uses it — nothing copies settings on.

    cli.py --argparse--> JobSpec --> commands/* --> PreparedJob(spec, ...) --> stages, actors

Fields are grouped by who reads them: `ModelSpec` (which SAM, where it runs), `SpeedSpec`
(the encoder's speed settings, resolved on each actor's device) and the job's own fields.
`export` has no JobSpec (it reads masks and takes its few arguments directly); `bench`
builds one like every command that runs the model, and times what it resolves to.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from persam_core.methods.registry import method_names
from persam_core.speed.options import DEFAULT_DINOV2, DINOV2_TYPES, SpeedFlags

from jobs.storage.images import DEFAULT_MAX_PIXELS

# Images per committed Parquet shard: 100M images make ~100k files of a few MB per concept,
# and a killed job loses at most the shards in flight. Outputs keep the shard count their
# first run recorded.
DEFAULT_SHARD_SIZE = 1024
# Images per model-actor call: one GPU batch at the CUDA default batch size, small enough
# that two chunks in flight per actor keep it busy while the CPU stages run.
DEFAULT_CHUNK_IMAGES = 16
# How the stages run: "ray" (Ray Data: local Ray, or the cluster in RAY_ADDRESS) or "local"
# (the same stage functions in this process, one after another: debugging, small inputs).
RUNNERS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")
# A run whose share of failed images (error rows) exceeds this fails, after committing.
DEFAULT_MAX_ERROR_RATE = 0.05
# Bytes read at most per image file (256 MiB): a larger file, or one that never ends (a
# device, a pipe), is an error row, never read past the limit. Pixels have their own limit.
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
# Seconds between progress lines where no live bar is drawn (captured logs).
DEFAULT_PROGRESS_INTERVAL = 30.0
CACHE_DTYPES = ("fp16", "fp32")
# `eval --benchmark`: PerSeg (or DAVIS 2017 with --video), or a few-shot benchmark
BENCHMARKS = ("perseg", "fss1000", "coco20i")


@dataclass(frozen=True)
class ModelSpec:
    """Which SAM (and which DINOv2, read only by methods that need it: GF-SAM) and where they
    run. `device` "auto" resolves on each actor's node."""

    model_type: str
    checkpoint: str = "random:0"
    device: str = "auto"
    dinov2: str = DEFAULT_DINOV2
    dinov2_checkpoint: str = "official"


@dataclass(frozen=True)
class SpeedSpec(SpeedFlags):
    """The model's speed flags (persam_core.speed.options.SpeedFlags, resolved on each actor's
    device by acceleration.resolve_speed: bf16 + fused + compile + batch 16 + TF32 matmuls on
    CUDA; decoder graphs, a compiled decoder and a bf16 decoder only when asked for) and the
    images per model-actor call."""

    chunk_size: int = DEFAULT_CHUNK_IMAGES

    def images_per_chunk(self) -> int:
        """A chunk holds at least one encoder batch."""
        return max(1, self.chunk_size, self.batch_size or 1)


@dataclass(frozen=True)
class JobSpec:
    command: str
    model: ModelSpec
    speed: SpeedSpec = SpeedSpec()
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec for every URL
    # segment, rank, eval
    concepts: tuple[str, ...] = ()  # concept files or folders of them
    input: str | None = None
    output: str | None = None
    # an Apache Iceberg table instead of --output (NAMESPACE.TABLE) and the pyiceberg catalog
    # holding it (None: the embedded one under PERSAM_CACHE); pipeline/output.py
    table: str | None = None
    catalog: str | None = None
    num_actors: int | None = None  # None: one per GPU, else 1
    shard_size: int = DEFAULT_SHARD_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_instances: int = 1
    min_similarity: float | None = None
    cache: str | None = None
    cache_dtype: str = "fp16"
    # compiled-encoder artifacts (pipeline/compile_cache.py): a folder or URL, "off"; None: under PERSAM_CACHE
    compile_cache: str | None = None
    top_k: int = 10
    runner: str = "ray"
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # share of this run's images that may fail
    dry_run: bool = False  # list, plan and report; no weights loaded, no Ray, nothing written
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    # how the run reports (jobs/logs.py); carried so that the actors log as the driver does
    log_level: str = "info"
    quiet: bool = False
    log_format: str = "text"
    # fit, eval
    images: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    method: str = "persam"
    name: str | None = None
    out: str | None = None
    epochs: int | None = None  # None: the command's default (fit and PerSeg 1000, video 800)
    data: str | None = None
    video: bool = False
    sequences: tuple[str, ...] | None = None
    # eval's few-shot benchmarks (jobs/commands/eval_fewshot.py)
    benchmark: str = "perseg"
    folds: tuple[int, ...] | None = None  # None: every COCO-20i fold
    shots: int = 1
    episodes: int | None = None  # None: the benchmark's own count
    seed: int = 0
    split: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse impossible values with the flag's name (before any work)."""
        counts = {"--batch-size": self.speed.batch_size, "--chunk-size": self.speed.chunk_size,
                  "--num-actors": self.num_actors, "--shard-size": self.shard_size,
                  "--max-instances": self.max_instances, "--epochs": self.epochs, "--max-pixels": self.max_pixels,
                  "--max-image-bytes": self.max_image_bytes, "--shots": self.shots, "--episodes": self.episodes}
        low = [flag for flag, value in counts.items() if value is not None and value < 1]
        if low:
            raise ValueError(f"{', '.join(low)}: give a count of at least 1")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: give 0 or more")
        if self.min_similarity is not None and not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"--min-similarity {self.min_similarity}: give a cosine-similarity threshold in [0, 1]")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate {self.max_error_rate}: give a share of images in [0, 1]")
        if not self.progress_interval > 0:
            raise ValueError(f"--progress-interval {self.progress_interval}: give seconds above 0")
        check_device(self.model.device)
        if self.command == "eval" and self.table and (self.video or self.benchmark != "perseg"):
            raise ValueError("--table: PerSeg's masks can go into a table; --video and few-shot benchmarks "
                             "keep theirs under --output")
        if self.video and self.benchmark != "perseg":
            raise ValueError(f"--video is DAVIS 2017; it does not combine with --benchmark {self.benchmark}")
        for flag, value, allowed in (("--runner", self.runner, RUNNERS), ("--method", self.method, method_names()),
                                     ("--cache-dtype", self.cache_dtype, CACHE_DTYPES),
                                     ("--dinov2", self.model.dinov2, DINOV2_TYPES),
                                     ("--benchmark", self.benchmark, BENCHMARKS)):
            if value not in allowed:
                raise ValueError(f"{flag} {value}: choose {', '.join(allowed)}")

    def error_rate_exceeded(self, failed: int, images: int) -> str | None:
        """The failure policy: None when `failed` of `images` (this run's) is acceptable, else
        why the run failed. A run in which every image failed always fails."""
        if images == 0 or failed == 0:
            return None
        if failed == images:
            return f"all {images} images failed (see the error column)"
        if failed / images > self.max_error_rate:
            return (f"{failed} of {images} images failed ({100 * failed / images:.1f} %), more than "
                    f"--max-error-rate {self.max_error_rate:g}; their error rows are committed")
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace, storage_options: dict[str, Any] | None = None) -> "JobSpec":
        """The parsed command line -> the spec, field by field (argparse dest = field name)."""
        given = vars(args)

        def pick(kind) -> dict[str, Any]:
            return {f.name: _frozen(given[f.name]) for f in fields(kind) if f.name in given}

        nested = {"model": ModelSpec(**pick(ModelSpec)), "speed": SpeedSpec(**pick(SpeedSpec)),
                  "storage_options": dict(storage_options or {})}
        own = {k: v for k, v in pick(cls).items() if k not in nested and k != "command"}
        return cls(command=args.command, **nested, **own)


def _frozen(value: Any) -> Any:
    """Repeatable flags arrive as lists: the spec holds tuples."""
    return tuple(value) if isinstance(value, list) else value


def check_device(device: str) -> str:
    """--device as given -> itself, or a one-line error (no CUDA touched: the driver may sit
    on a CPU-only head; "auto" resolves on each actor's node)."""
    if device not in DEVICES:
        raise ValueError(f"--device {device}: choose {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
    return device
