"""The `persam` argument parser: every subcommand's flags, help texts, defaults from jobs/spec.py.

Flags land in argparse `dest`s named like JobSpec's fields (JobSpec.from_args picks them up
by name). Imports stay light: `persam --help` must not load torch, Ray or pyarrow.
"""

from __future__ import annotations

import argparse

from persam_core.modeling.families import model_types
from persam_core.methods.registry import method_names
from persam_core.speed.options import DECODER_PRECISIONS, DINOV2_TYPES, GPU_BATCH_SIZE, SPEED_PRECISIONS

from jobs.exports import EXPORTS
from jobs.logs import LOG_FORMATS, LOG_LEVELS
from jobs.spec import (BENCHMARKS, CACHE_DTYPES, DEFAULT_MAX_ERROR_RATE, DEFAULT_PROGRESS_INTERVAL, RUNNERS,
                       JobSpec, ModelSpec, SpeedSpec)

INPUT_HELP = "directory/prefix, glob, or manifest (.parquet/.csv/.txt)"
CHECKPOINT_HELP = "official SAM state dict: local path, s3://, gs://, https://, 'official', or random:SEED"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, once: added where the help does not already
    explain it (conditional defaults such as "16 on CUDA, 1 on CPU" are written out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


class VersionAction(argparse.Action):
    """--version: the installed package's version, looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("persam")
        except PackageNotFoundError:
            found = "unknown (not installed)"
        print(f"persam {found}")
        parser.exit()


def _add_reporting(parser: argparse.ArgumentParser) -> None:
    """How every command reports (jobs/logs.py)."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=JobSpec.log_level,
                        help="debug also prints the full (redacted) traceback of an error")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only (same as --log-level warning)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=JobSpec.log_format,
                        help="json: one JSON object per line (time, level, logger, message) for log collectors")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress-interval", type=float, default=DEFAULT_PROGRESS_INTERVAL, metavar="SECONDS",
                        help="seconds between progress lines where stderr is not a terminal (a terminal gets a live bar)")


def _names(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_model(parser: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    # Model types are checked by the registry so the error lists the valid ones.
    parser.add_argument("--model-type", required=True, help=f"model architecture: {', '.join(model_types())}")
    parser.add_argument("--checkpoint", required=checkpoint_required, default=ModelSpec.checkpoint, help=CHECKPOINT_HELP)
    parser.add_argument("--device", default=ModelSpec.device, help="auto, cpu or cuda")
    parser.add_argument("--storage-options", default=None, help="JSON passed to fsspec for every URL")
    parser.add_argument("--dinov2", choices=DINOV2_TYPES, default=ModelSpec.dinov2,
                        help="DINOv2 size for GF-SAM concepts (loaded only when a GF-SAM concept is fitted or run)")
    parser.add_argument("--dinov2-checkpoint", default=ModelSpec.dinov2_checkpoint,
                        help="DINOv2 state dict in the official dinov2_vit*14_pretrain.pth key format: local path, "
                             "any fsspec URL, 'official', or random:SEED")


def _add_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=None, help="embedding cache URL: encoder features stored once per image and model")
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=JobSpec.cache_dtype,
                        help="feature precision in the cache (fp16: 2 MiB per image, fp32: 4 MiB)")


def _add_speed(parser: argparse.ArgumentParser) -> None:
    """The model's speed settings; None / auto resolve on each actor's device (acceleration.resolve_speed)."""
    parser.add_argument("--precision", choices=SPEED_PRECISIONS, default=SpeedSpec.precision,
                        help="image-encoder precision (auto: bf16 on CUDA, fp32 on CPU; fp32 is the "
                             "reference path, the others are measured against it by `bench`)")
    parser.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="encoder attention via scaled_dot_product_attention (default: on with CUDA "
                             "bf16/fp16, else off)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the image encoder (default: on with CUDA bf16/fp16, else off)")
    parser.add_argument("--compile-cache", default=None, metavar="LOCATION",
                        help="where compiled encoders are kept between runs, so that the next run starts warm: "
                             "a folder or URL (one a cluster's nodes share); off: none (default: "
                             "PERSAM_CACHE/compile on each node)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per encoder batch (default: {GPU_BATCH_SIZE} on CUDA, 1 on CPU)")
    parser.add_argument("--chunk-size", type=int, default=SpeedSpec.chunk_size,
                        help="images per model-actor call, within one shard (at least --batch-size)")
    parser.add_argument("--decoder-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay SAM's prompt encoder + mask decoder as CUDA graphs (one launch per pass "
                             "instead of ~320; SAM only; default: off)")
    parser.add_argument("--decoder-precision", choices=DECODER_PRECISIONS, default=SpeedSpec.decoder_precision,
                        help="SAM's prompt encoder + mask decoder: fp32 (the reference path) or bf16 autocast "
                             "(SAM only; recorded in the output's settings)")
    parser.add_argument("--decoder-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile SAM's prompt encoder + mask decoder (fused kernels; with "
                             "--decoder-graphs, replayed as CUDA graphs too; SAM only; default: off)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA's fp32 matrix products (location prior, mask decoder) in TF32 (default: on "
                             "with CUDA bf16/fp16, else off; recorded in the output's settings)")


def _add_job(parser: argparse.ArgumentParser) -> None:
    """Settings of every command that runs the pipeline."""
    parser.add_argument("--num-actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    parser.add_argument("--runner", choices=RUNNERS, default=JobSpec.runner,
                        help="ray: Ray Data (local Ray, or the cluster in RAY_ADDRESS); local: the same stages "
                             "in this process, one chunk after another (debugging, small inputs)")
    parser.add_argument("--max-error-rate", type=float, default=DEFAULT_MAX_ERROR_RATE, metavar="SHARE",
                        help="exit 4 (after committing) when a larger share of this run's images failed; "
                             "a run in which every image failed always fails")
    parser.add_argument("--max-image-bytes", type=int, default=JobSpec.max_image_bytes, metavar="BYTES",
                        help="larger image files become error rows, unread past the limit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and list the input, plan the shards, name concepts and model, then stop: "
                             "no weights loaded, no Ray, nothing written")
    _add_progress(parser)


def _add_catalog(parser: argparse.ArgumentParser) -> None:
    """--catalog: the catalog of a --table, an Apache Iceberg table (docs/iceberg.md)."""
    parser.add_argument("--catalog", default=None, metavar="NAME",
                        help="the --table's catalog, as pyiceberg configures it (.pyiceberg.yaml or "
                             "PYICEBERG_CATALOG__<NAME>__URI/__TYPE/__WAREHOUSE); default: an embedded SQLite "
                             "catalog under PERSAM_CACHE/iceberg")


def _add_table(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--table", default=None, metavar="NAMESPACE.TABLE",
                        help=f"{what} an Apache Iceberg table of --catalog (created when missing)")
    _add_catalog(parser)


def _add_concepts_and_io(parser: argparse.ArgumentParser, concept_help: str, input_help: str, output_help: str,
                         table: str | None = None) -> None:
    """table: the help of --table where the output may be a table instead (one of the two is required)."""
    parser.add_argument("--concept", dest="concepts", metavar="CONCEPT", action="append", required=True,
                        help=concept_help)
    parser.add_argument("--input", required=True, help=input_help)
    if table is None:
        parser.add_argument("--output", required=True, help=output_help)
        return
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", help=output_help)
    where.add_argument("--table", default=None, metavar="NAMESPACE.TABLE", help=table)
    _add_catalog(parser)


def _add_fit(commands) -> None:
    fit = commands.add_parser("fit", help="learn a concept from reference image(s) + mask(s)")
    _add_model(fit)
    fit.add_argument("--image", dest="images", metavar="IMAGE", action="append", required=True,
                     help="reference image URL (repeat for several shots)")
    fit.add_argument("--mask", dest="masks", metavar="MASK", action="append", required=True,
                     help="its mask (any non-zero pixel is the object)")
    fit.add_argument("--method", choices=method_names(), default=JobSpec.method)
    fit.add_argument("--name", required=True, help="concept name (a plain word)")
    fit.add_argument("--out", required=True, help="concept file to write (JSON)")
    fit.add_argument("--epochs", type=int, default=None, help="PerSAM-F fitting epochs (default 1000)")
    _add_progress(fit)


def _add_segment(commands) -> None:
    segment = commands.add_parser("segment", help="segment concepts in every image of --input (Ray Data job)")
    _add_model(segment)
    _add_concepts_and_io(segment, "concept file or directory (repeatable)", INPUT_HELP,
                         "Parquet dataset directory (any fsspec URL)",
                         "instead of --output: an Apache Iceberg table of --catalog (created when missing)")
    _add_job(segment)
    segment.add_argument("--shard-size", type=int, default=JobSpec.shard_size,
                         help="images per committed Parquet shard of a new output")
    segment.add_argument("--max-pixels", type=int, default=JobSpec.max_pixels, help="larger images become error rows")
    segment.add_argument("--max-instances", type=int, default=JobSpec.max_instances,
                         help="instances per (image, concept), >= 1")
    _add_cache(segment)
    _add_speed(segment)
    segment.add_argument("--min-similarity", type=float, default=None,
                         help="presence threshold in [0, 1]: rows below it get present=false and an empty mask")


def _add_rank(commands) -> None:
    rank = commands.add_parser("rank", help="rank every image of --input by the presence of one concept")
    _add_model(rank)
    _add_concepts_and_io(rank, "concept file written by `persam fit`", INPUT_HELP,
                         "directory for ranking.parquet (any fsspec URL)",
                         "instead of --output: an Apache Iceberg table of --catalog for the ranking (replaced whole)")
    rank.add_argument("--top-k", type=int, default=JobSpec.top_k, help="images that also get a mask")
    _add_job(rank)
    rank.add_argument("--shard-size", type=int, default=JobSpec.shard_size,
                      help="images per shard (and cache shard)")
    _add_cache(rank)
    _add_speed(rank)


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="mask Parquet -> COCO, Label Studio, Hugging Face datasets, "
                                 "review gallery or subject crops")
    export.add_argument("kind", choices=tuple(EXPORTS), help="; ".join(f"{k.name}: {k.help}" for k in EXPORTS.values()))
    masks = export.add_mutually_exclusive_group(required=True)
    masks.add_argument("--masks", help="the --output of `persam segment`")
    masks.add_argument("--table", default=None, metavar="NAMESPACE.TABLE",
                       help="instead of --masks: the --table of `persam segment`")
    _add_catalog(export)
    files = ", ".join(k.name for k in EXPORTS.values() if k.file_name)
    export.add_argument("--output", required=True, help=f"JSON file ({files}) or folder (any fsspec URL)")
    export.add_argument("--images", default=None, help="where the images are now, if they moved")
    export.add_argument("--image-root", default=None, help="coco / hf-dataset file names are relative to this "
                        "(default: --images, else the common folder of the image URIs)")
    export.add_argument("--storage-options", default=None, help="JSON passed to fsspec for every URL")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="PerSeg mIoU/bIoU, DAVIS 2017 J&F with --video, or FSS-1000 / "
                                   "COCO-20i few-shot mIoU with --benchmark (Ray job)")
    _add_model(evaluate)
    evaluate.add_argument("--data", required=True, help="PerSeg root (Images/, Annotations/), DAVIS 2017 root (--video), "
                          "FSS-1000 folder of class folders, or COCO 2014 root (annotations/, val2014/)")
    evaluate.add_argument("--output", required=True, help="directory for metrics.json, metrics.md and the masks")
    evaluate.add_argument("--method", choices=method_names(), default=JobSpec.method)
    _add_table(evaluate, "the masks into (instead of <output>/masks):")
    evaluate.add_argument("--video", action="store_true", help="DAVIS 2017 layout: J, F and J&F")
    evaluate.add_argument("--epochs", type=int, default=None, help="PerSAM-F fit epochs (default 1000; video 800)")
    _add_job(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=None,
                          help=f"images per encoder batch (default: {GPU_BATCH_SIZE} on CUDA, 1 on CPU)")
    evaluate.add_argument("--sequences", type=_names, default=None,
                          help="comma-separated DAVIS sequences (default: ImageSets/2017/val.txt, else all)")
    evaluate.add_argument("--precision", choices=SPEED_PRECISIONS, default=SpeedSpec.precision,
                          help="image-encoder precision of the segment job (auto: bf16 on CUDA, fp32 on CPU; "
                               "fp32 is the reference path)")
    evaluate.add_argument("--benchmark", choices=BENCHMARKS, default=JobSpec.benchmark,
                          help="perseg (or DAVIS with --video); fss1000 / coco20i: few-shot episodes, one concept "
                               "fitted per episode from its supports (docs/evaluation.md)")
    evaluate.add_argument("--fold", dest="folds", type=int, action="append", default=None,
                          help="COCO-20i fold 0-3, repeatable (default: all four); metrics has each and their mean")
    evaluate.add_argument("--shots", type=int, default=JobSpec.shots, help="support images per few-shot episode")
    evaluate.add_argument("--episodes", type=int, default=None,
                          help="episodes per fold (default: COCO-20i 1000; FSS-1000 every image of every class)")
    evaluate.add_argument("--seed", type=int, default=JobSpec.seed, help="few-shot episode seed (upstream's is 0)")
    evaluate.add_argument("--split", default=None,
                          help="FSS-1000: class list file (e.g. splits/test.txt; default: every class folder); "
                               "COCO-20i: folder of fold0.pkl..fold3.pkl image lists (default: every image "
                               "holding the class)")


def _add_track(commands) -> None:
    track = commands.add_parser("track", help="follow one concept through video clips with SAM 2's memory (Ray job)")
    _add_model(track)
    _add_concepts_and_io(track, "concept file (one concept, fitted with the same SAM 2 weights)",
                         "a clip's folder of frames (name order), or a folder of clip folders",
                         "folder for <clip>/<frame>.png masks and track.json")
    track.add_argument("--min-similarity", type=float, default=None,
                       help="presence in [0, 1] from which the concept counts as found (default: the tracker's, see README)")
    _add_job(track)


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="time encoder, PerSAM, PerSAM-F, K concepts and the reference loop")
    _add_model(bench, checkpoint_required=False)
    bench.add_argument("--images", type=int, required=True, help="generated images to time")
    bench.add_argument("--concepts", type=int, default=8, help="K concepts per image")
    bench.add_argument("--epochs", type=int, default=1000, help="PerSAM-F fit epochs to time")
    bench.add_argument("--json", action="store_true", help="last line: one JSON object")
    bench.add_argument("--variants", action="store_true", default=None,
                       help="also time fp32/bf16/fp16/fused encoders and their IoU vs fp32 (default on CUDA)")
    _add_speed(bench)  # the flags every command that runs the model takes; the variants are timed beside them
    bench.add_argument("--gfsam", action="store_true",
                       help="also time GF-SAM beside PerSAM (SAM and DINOv2 on the stretched frame, the GF-SAM pass "
                            "for 1 and --concepts concepts, rank's presence; with --job: its jobs beside PerSAM's, same "
                            "images); --dinov2 / --dinov2-checkpoint choose DINOv2")
    bench.add_argument("--job", action="store_true",
                       help="run the real Ray job (K = 1 and K = --concepts) beside the in-process paths and the encoder")
    bench.add_argument("--num-actors", type=int, default=None, help="--job: model actors (default: one per GPU, else 1)")
    bench.add_argument("--shard-size", type=int, default=JobSpec.shard_size,
                       help="--job: images per shard (the job's own default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persam", description="PerSAM / PerSAM-F personalised segmentation at scale",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction, help="print the installed version and exit")
    commands = _Commands(parser.add_subparsers(dest="command", required=True))
    for add in (_add_fit, _add_segment, _add_rank, _add_export, _add_eval, _add_track, _add_bench):
        add(commands)
    return parser


class _Commands:
    """Subcommand parsers with the shared help format and reporting flags."""

    def __init__(self, subparsers) -> None:
        self.subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        parser = self.subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)
        _add_reporting(parser)
        return parser
