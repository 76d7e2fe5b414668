"""The `persam` command line: argument parsing, logging set-up, error reporting, exit codes.

Module-level imports stay light (no torch, Ray, Pillow or pyarrow): `persam --help` and
`--version` answer at once; each command imports its code when it runs.

Exit codes (README "Logging and exit codes"):
    0  done
    1  unexpected failure (a library's error; the line gives its type)
    2  usage error (argparse: unknown flag, missing argument)
    3  bad input or configuration (the line names the file or flag and what to do)
    4  the job ran and committed what it did, but more images failed than --max-error-rate allows
  130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM: what was committed stays committed
       (128 + the signal's number; docs/guarantees-process.md)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Sequence

from jobs.cli_parser import build_parser
from jobs.spec import JobSpec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_JOB_FAILED = 0, 1, 2, 3, 4
# Deprecated: "1" makes bad input exit 2 again, as before exit codes were split (removed in 0.3).
logger = logging.getLogger("jobs.cli")  # not __name__: `python -m jobs.cli` runs it as __main__

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


def _run(args: argparse.Namespace) -> int:
    storage = _storage_options(args.storage_options)
    if args.command == "export":
        from jobs.commands.export import run_export

        logger.info(run_export(args.kind, args.masks, args.output, args.images, storage, args.image_root,
                               table=args.table, catalog=args.catalog))
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

        if spec.benchmark != "perseg":
            from jobs.commands.eval_fewshot import run_fewshot_eval

            metrics, keys = run_fewshot_eval(spec), ("miou", "fb_iou")
        else:
            metrics = (run_video_eval if spec.video else run_perseg_eval)(spec)
            keys = ("jf", "j", "f") if spec.video else ("miou", "biou")
        if metrics is None:  # --dry-run
            return EXIT_OK
        logger.info("done: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" -> {args.output}/metrics.json")
        return _judge(spec, metrics.get("targets_failed", 0), metrics.get("targets_run", 0))
    if spec.command == "track":
        from jobs.commands.track import run_track

        clips = run_track(spec)["clips"]
        logger.info(f"done: {len(clips)} clips, concept found in {sum(c['found_at'] is not None for c in clips)} "
                    f"-> {args.output}/track.json")
        return EXIT_OK
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
    from jobs.spec import JobSpec

    if args.images < 1 or args.concepts < 1:
        raise ValueError("--images and --concepts must be at least 1")
    if any(v is not None and v < 1 for v in (args.batch_size, args.num_actors, args.shard_size)):
        raise ValueError("--batch-size, --num-actors and --shard-size must be at least 1")
    spec = JobSpec.from_args(args)
    if args.job:
        from jobs.commands.bench_job import JobBenchOptions, job_table, run_job_bench

        result = run_job_bench(JobBenchOptions(spec, args.images, args.concepts, gfsam=args.gfsam))
        print(job_table(result))
        if args.json:
            print(json.dumps(result))
        return 0
    result = run_bench(spec, args.images, args.concepts, args.epochs, args.variants)
    if args.gfsam:
        from jobs.commands.bench_gfsam import run_gfsam_bench

        result.update(run_gfsam_bench(spec, args.images, args.concepts, result["persam_s_per_image"]))
    print_bench(result, args.json)
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
    from persam_core.errors import describe, message_line
    from jobs.storage.redaction import scrub

    line = describe(error, 1000) if with_type else (message_line(error) or type(error).__name__)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes in the module docstring. Any error ends in one line on stderr, credentials
    scrubbed; the full traceback (scrubbed too) only with --log-level debug."""
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits 2
    from jobs.logs import configure, json_stderr
    from jobs.pipeline.signals import Stopped, ignore_stop_signals, stop_signals_caught

    configure(args.log_level, args.quiet, args.log_format)
    with stop_signals_caught(), json_stderr() if args.log_format == "json" else contextlib.nullcontext():
        try:
            return _guarded(args)
        except (Stopped, KeyboardInterrupt) as stop:  # KeyboardInterrupt: a library restored Python's own handler
            ignore_stop_signals()  # a second Ctrl-C while the line is written changes nothing
            name, code = (stop.name, stop.exit_code) if isinstance(stop, Stopped) else ("SIGINT", 130)
            _report(args.command, "stopped", f"{name} received; what was committed stays committed, "
                    "a rerun continues from there", code)
            return code


def _guarded(args: argparse.Namespace) -> int:
    """The command, any error turned into its one line and exit code."""
    from jobs.pipeline.host_memory import keep_large_buffers
    from jobs.logs import settings

    keep_large_buffers()  # before any tensor work in this process (see host_memory.py)
    secrets = _secrets(args)
    try:
        return _run(args)
    except (ValueError, OSError) as error:  # our errors carry a one-line reason naming the file
        failure, code, word, with_type = error, EXIT_BAD_INPUT, "error", False
        from jobs.storage.files import is_machine_failure

        if is_machine_failure(error):  # a full disk: the machine, not the input (exit 1, typed)
            code, word, with_type = EXIT_FAILED, "failed", True
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
