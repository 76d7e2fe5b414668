"""The `persam` command line: argument parsing, logging set-up, error reporting, exit codes.

Module-level imports stay light (no torch, Ray, Pillow or pyarrow): `persam --help` and
`--version` answer at once; each command imports its code when it runs.

Exit codes (README "Logging and exit codes"):
    0  done
    1  unexpected failure (a library's error; the line gives its type)
    2  usage error (argparse: unknown flag, missing argument)
    3  bad input or configuration (the line names the file or flag and what to do)
    4  the job ran and committed what it did, but more images failed than --max-error-rate allows
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from persam_core.options import GPU_BATCH_SIZE, MODEL_TYPES, SPEED_PRECISIONS

from jobs.logs import LOG_FORMATS, LOG_LEVELS
from jobs.spec import (CACHE_DTYPES, DEFAULT_MAX_ERROR_RATE, DEFAULT_PROGRESS_INTERVAL, METHODS, RUNNERS, JobSpec,
                       ModelSpec, SpeedSpec)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_JOB_FAILED = 0, 1, 2, 3, 4
# Deprecated: "1" makes bad input exit 2 again, as before exit codes were split (removed in 0.3).
LEGACY_EXIT_CODES = "PERSAM_LEGACY_EXIT_CODES"
logger = logging.getLogger("jobs.cli")  # not __name__: `python -m jobs.cli` runs it as __main__

MODEL_TYPE_HELP = f"SAM architecture: {', '.join(MODEL_TYPES)}"
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


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("--storage-options must be a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return value


def _names(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_model(parser: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    # Model types are checked by the registry so the error lists the valid ones.
    parser.add_argument("--model-type", required=True, help=MODEL_TYPE_HELP)
    parser.add_argument("--checkpoint", required=checkpoint_required, default=ModelSpec.checkpoint, help=CHECKPOINT_HELP)
    parser.add_argument("--device", default=ModelSpec.device, help="auto, cpu or cuda")
    parser.add_argument("--storage-options", default=None, help="JSON passed to fsspec for every URL")


def _add_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=None, help="embedding cache URL: encoder features stored once per image and model")
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=JobSpec.cache_dtype,
                        help="feature precision in the cache (fp16: 2 MiB per image, fp32: 4 MiB)")


def _add_speed(parser: argparse.ArgumentParser) -> None:
    """The encoder's speed settings; None / auto resolve on each actor's device (acceleration.resolve_speed)."""
    parser.add_argument("--precision", choices=SPEED_PRECISIONS, default=SpeedSpec.precision,
                        help="image-encoder precision (auto: bf16 on CUDA, fp32 on CPU; fp32 is the "
                             "reference path, the others are measured against it by `bench`)")
    parser.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="encoder attention via scaled_dot_product_attention (default: on with CUDA "
                             "bf16/fp16, else off)")
    parser.add_argument("--compile", dest="compile_encoder", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the image encoder (default: on with CUDA bf16/fp16, else off)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per encoder batch (default: {GPU_BATCH_SIZE} on CUDA, 1 on CPU)")
    parser.add_argument("--chunk-size", type=int, default=SpeedSpec.chunk_size,
                        help="images per model-actor call, within one shard (at least --batch-size)")


def _add_job(parser: argparse.ArgumentParser) -> None:
    """Settings of every command that runs the pipeline."""
    parser.add_argument("--num-actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    parser.add_argument("--runner", choices=RUNNERS, default=JobSpec.runner,
                        help="ray: Ray Data (local Ray, or the cluster in RAY_ADDRESS); local: the same stages "
                             "in this process, one chunk after another (debugging, small inputs)")
    parser.add_argument("--max-error-rate", type=float, default=DEFAULT_MAX_ERROR_RATE, metavar="SHARE",
                        help="exit 4 (after committing) when a larger share of this run's images failed; "
                             "a run in which every image failed always fails")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and list the input, plan the shards, name concepts and model, then stop: "
                             "no weights loaded, no Ray, nothing written")
    _add_progress(parser)


def _add_fit(commands) -> None:
    fit = commands.add_parser("fit", help="learn a concept from reference image(s) + mask(s)")
    _add_model(fit)
    fit.add_argument("--image", dest="images", metavar="IMAGE", action="append", required=True,
                     help="reference image URL (repeat for several shots)")
    fit.add_argument("--mask", dest="masks", metavar="MASK", action="append", required=True,
                     help="its mask (any non-zero pixel is the object)")
    fit.add_argument("--method", choices=METHODS, default=JobSpec.method)
    fit.add_argument("--name", required=True, help="concept name (a plain word)")
    fit.add_argument("--out", required=True, help="concept file to write (JSON)")
    fit.add_argument("--epochs", type=int, default=None, help="PerSAM-F fitting epochs (default 1000)")
    _add_progress(fit)


def _add_segment(commands) -> None:
    segment = commands.add_parser("segment", help="segment concepts in every image of --input (Ray Data job)")
    _add_model(segment)
    segment.add_argument("--concept", dest="concepts", metavar="CONCEPT", action="append", required=True,
                         help="concept file or directory (repeatable)")
    segment.add_argument("--input", required=True, help="directory/prefix, glob, or manifest (.parquet/.csv/.txt)")
    segment.add_argument("--output", required=True, help="Parquet dataset directory (any fsspec URL)")
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
    rank.add_argument("--concept", dest="concepts", metavar="CONCEPT", action="append", required=True,
                      help="concept file written by `persam fit`")
    rank.add_argument("--input", required=True, help="directory/prefix, glob, or manifest (.parquet/.csv/.txt)")
    rank.add_argument("--output", required=True, help="directory for ranking.parquet (any fsspec URL)")
    rank.add_argument("--top-k", type=int, default=JobSpec.top_k, help="images that also get a mask")
    _add_job(rank)
    rank.add_argument("--shard-size", type=int, default=JobSpec.shard_size,
                      help="images per shard (and cache shard)")
    _add_cache(rank)
    _add_speed(rank)


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="mask Parquet -> COCO JSON, overlay gallery or subject crops")
    export.add_argument("kind", choices=("coco", "overlays", "subjects"))
    export.add_argument("--masks", required=True, help="the --output of `persam segment`")
    export.add_argument("--output", required=True, help="JSON file (coco) or directory")
    export.add_argument("--images", default=None, help="where the images are now, if they moved")
    export.add_argument("--storage-options", default=None, help="JSON passed to fsspec for every URL")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="PerSeg mIoU/bIoU, or DAVIS 2017 J&F with --video (Ray job)")
    _add_model(evaluate)
    evaluate.add_argument("--data", required=True, help="PerSeg root (Images/, Annotations/) or DAVIS 2017 root (--video)")
    evaluate.add_argument("--output", required=True, help="directory for metrics.json, metrics.md and the masks")
    evaluate.add_argument("--method", choices=METHODS, default=JobSpec.method)
    evaluate.add_argument("--video", action="store_true", help="DAVIS 2017 layout: J, F and J&F")
    evaluate.add_argument("--epochs", type=int, default=None, help="PerSAM-F fit epochs (default 1000; video 800)")
    _add_job(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=None,
                          help=f"images per encoder batch (default: {GPU_BATCH_SIZE} on CUDA, 1 on CPU)")
    evaluate.add_argument("--sequences", type=_names, default=None,
                          help="comma-separated DAVIS sequences (default: ImageSets/2017/val.txt, else all)")


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="time encoder, PerSAM, PerSAM-F, K concepts and the reference loop")
    _add_model(bench, checkpoint_required=False)
    bench.add_argument("--images", type=int, required=True, help="generated images to time")
    bench.add_argument("--concepts", type=int, default=8, help="K concepts per image")
    bench.add_argument("--epochs", type=int, default=1000, help="PerSAM-F fit epochs to time")
    bench.add_argument("--json", action="store_true", help="last line: one JSON object")
    bench.add_argument("--variants", action="store_true", default=None,
                       help="also time fp32/bf16/fp16/fused encoders and their IoU vs fp32 (default on CUDA)")
    bench.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="image-encoder precision (auto: bf16 on CUDA, fp32 on CPU)")
    bench.add_argument("--batch-size", type=int, default=None, help="images per encoder batch (default: 16 on CUDA, 1 on CPU)")
    bench.add_argument("--job", action="store_true",
                       help="run the real Ray job (K = 1 and K = --concepts) beside the in-process paths and the encoder")
    bench.add_argument("--num-actors", type=int, default=None, help="--job: model actors (default: one per GPU, else 1)")
    bench.add_argument("--shard-size", type=int, default=None, help="--job: images per shard (default: images / 8, at most 32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persam", description="PerSAM / PerSAM-F personalised segmentation at scale",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction, help="print the installed version and exit")
    commands = _Commands(parser.add_subparsers(dest="command", required=True))
    for add in (_add_fit, _add_segment, _add_rank, _add_export, _add_eval, _add_bench):
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


def _run(args: argparse.Namespace) -> int:
    storage = _storage_options(args.storage_options)
    if args.command == "export":
        from jobs.export import run_export

        logger.info(run_export(args.kind, args.masks, args.output, args.images, storage))
        return EXIT_OK
    if args.command == "bench":
        return _bench(args)
    spec = JobSpec.from_args(args, storage)  # refuses impossible values before any work
    if spec.command == "fit":
        from jobs.commands.fit import run_fit

        run_fit(spec)
        return EXIT_OK
    if spec.command == "segment":
        from jobs.commands.segment import run_segment

        summary = run_segment(spec)
        if summary is None:  # --dry-run
            return EXIT_OK
        logger.info(summary.line())
        return _judge(spec, summary.failed, summary.images)
    if spec.command == "rank":
        from jobs.commands.rank import run_rank
        from jobs.storage.schema import error_count

        ranking = run_rank(spec)
        return EXIT_OK if ranking is None else _judge(spec, error_count(ranking), ranking.num_rows)
    if spec.command == "eval":
        from jobs.commands.eval_perseg import run_perseg_eval
        from jobs.commands.eval_video import run_video_eval

        metrics = (run_video_eval if spec.video else run_perseg_eval)(spec)
        if metrics is None:  # --dry-run
            return EXIT_OK
        keys = ("jf", "j", "f") if spec.video else ("miou", "biou")
        logger.info("done: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" -> {args.output}/metrics.json")
        return _judge(spec, metrics.get("targets_failed", 0), metrics.get("targets_run", 0))
    raise AssertionError(spec.command)


def _judge(spec: JobSpec, failed: int, images: int) -> int:
    """The failure policy, after the run committed its work: exit 4 when too many images failed."""
    reason = spec.error_rate_exceeded(failed, images)
    if reason is None:
        return EXIT_OK
    _report(spec.command, "failed", reason, EXIT_JOB_FAILED)
    return EXIT_JOB_FAILED


def _bench(args: argparse.Namespace) -> int:
    from jobs.commands.bench import print_bench, run_bench
    from jobs.pipeline.session import resolve_device

    if args.images < 1 or args.concepts < 1:
        raise ValueError("--images and --concepts must be at least 1")
    if any(v is not None and v < 1 for v in (args.batch_size, args.num_actors, args.shard_size)):
        raise ValueError("--batch-size, --num-actors and --shard-size must be at least 1")
    if args.job:
        from jobs.commands.bench_job import JobBenchOptions, job_table, run_job_bench

        result = run_job_bench(JobBenchOptions(args.model_type, args.checkpoint, args.images, args.concepts, args.device,
                                               args.precision, args.batch_size, args.num_actors, args.shard_size))
        print(job_table(result))
        if args.json:
            print(json.dumps(result))
        return 0
    print_bench(run_bench(args.model_type, args.checkpoint, args.images, args.concepts, resolve_device(args.device),
                          args.epochs, args.variants, args.precision, args.batch_size), args.json)
    return 0


def _secrets(args: argparse.Namespace) -> set[str]:
    """What the user gave that could hold a credential: URL userinfo / query strings, storage options."""
    from jobs.storage.redaction import secrets_in

    found = secrets_in(vars(args).values())
    try:
        options = json.loads(getattr(args, "storage_options", None) or "{}")
    except json.JSONDecodeError:
        options = {}
    return found | (secrets_in([options], every_string=True) if isinstance(options, dict) else set())


def _one_line(error: BaseException, secrets: set[str], with_type: bool) -> str:
    from jobs.storage.redaction import scrub

    # KeyError's str() is a repr (newlines escaped): take the message itself where there is one
    single = len(error.args) == 1 and isinstance(error.args[0], str)
    text = (error.args[0] if single else str(error)).strip()
    first = text.splitlines()[0] if text else ""
    line = f"{type(error).__name__}: {first}" if with_type and first else (first or type(error).__name__)
    return scrub(line, secrets)[:1000]


def _report(command: str, word: str, line: str, code: int, traceback_text: str | None = None) -> None:
    """The command's last word on stderr: one line (text), or one JSON object (--log-format json)."""
    from jobs.logs import json_line, settings

    text = f"persam {command}: {word}: {line}"
    if settings().format == "json":
        fields = {"command": command, "exit_code": code}
        if traceback_text:
            fields["traceback"] = traceback_text
        print(json_line("error", text, **fields), file=sys.stderr)
        return
    if traceback_text:
        print(traceback_text.rstrip("\n"), file=sys.stderr)
    print(text, file=sys.stderr)


def _bad_input_code() -> int:
    return EXIT_USAGE if os.environ.get(LEGACY_EXIT_CODES) == "1" else EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes in the module docstring. Any error ends in one line on stderr, credentials
    scrubbed; the full traceback (scrubbed too) only with --log-level debug."""
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits 2
    from jobs.logs import configure, settings

    configure(args.log_level, args.quiet, args.log_format)
    secrets = _secrets(args)
    try:
        return _run(args)
    except (ValueError, OSError) as error:  # our errors carry a one-line reason naming the file
        failure, code, word, with_type = error, _bad_input_code(), "error", False
    except Exception as error:  # a library's error (e.g. botocore's, which may quote a signed URL)
        failure, code, word, with_type = error, EXIT_FAILED, "failed", True
    trace = None
    if settings().debug:
        import traceback

        from jobs.storage.redaction import scrub

        trace = scrub("".join(traceback.format_exception(failure)), secrets)
    _report(args.command, word, _one_line(failure, secrets, with_type), code, trace)
    return code


if __name__ == "__main__":
    sys.exit(main())
