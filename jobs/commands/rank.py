"""`persam rank`: score every image of --input for one concept by its presence score.

Pass 1 (all images) computes only the location prior: similarity = max of S, and the
positive point; no mask decoding. Pass 2 segments the --top-k best. With a warm cache
neither pass runs the image encoder. Output: `<output>/ranking.parquet`, sorted by
similarity (highest first), masks for the top k.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from jobs.pipeline import commit
from jobs.storage.checkpoints import redact
from jobs.pipeline.payload import ipc_to_table
from jobs.pipeline.run import DEFAULT_CHUNK_IMAGES, PipelineSpec, run_pipeline
from jobs.pipeline.session import local_cluster, start_ray
from jobs.storage.schema import MASK_SCHEMA
from jobs.commands.segment import list_all_images, prepare_job, read_concepts

RANKING_FILE = "ranking.parquet"


@dataclass
class RankOptions:
    model_type: str
    checkpoint: str
    concept: str
    input: str
    output: str
    top_k: int = 10
    device: str = "auto"
    batch_size: int | None = None  # None: resolve_speed's default for the actor's device
    num_actors: int | None = None
    shard_size: int = commit.DEFAULT_SHARD_SIZE
    storage_options: dict = field(default_factory=dict)
    cache: str | None = None
    cache_dtype: str = "fp16"
    precision: str = "auto"
    fused_attention: bool | None = None
    compile_encoder: bool | None = None
    chunk_size: int = DEFAULT_CHUNK_IMAGES


def _collect(shard: dict, chunks: list[dict]) -> dict:
    """A shard's chunks -> its rows (a ranking is global: nothing is committed per shard)."""
    return {"table": pa.concat_tables([ipc_to_table(c["table"]) for c in chunks]),
            "encoded": sum(int(c["encoded"]) for c in chunks), "cache_hits": sum(int(c["cache_hits"]) for c in chunks),
            "problems": [p for c in chunks for p in json.loads(c["problems"])]}


def _shards(urls: list[str], num_shards: int) -> list[dict]:
    """The same stable-hash shards as `segment` (so cache files line up), all to run."""
    plan = commit.plan_shards(urls, num_shards, {})
    return [{"shard": s["shard"], "urls": s["urls"], "previous": []} for s in plan.to_run]


def ranking_table(scores: pa.Table, masks: pa.Table | None) -> pa.Table:
    """Scores sorted by similarity (nulls last) joined with the top-k mask columns."""
    rows = sorted(scores.to_pylist(), key=lambda r: (r["similarity"] is None, -(r["similarity"] or 0.0), r["image_uri"]))
    by_url = {m["image_uri"]: m for m in (masks.to_pylist() if masks is not None else []) if m["instance"] == 0}
    out = []
    for rank, row in enumerate(rows, start=1):
        mask = by_url.get(row["image_uri"], {})
        out.append({**row, "rank": rank, "width": mask.get("width"), "height": mask.get("height"),
                    "mask_rle": mask.get("mask_rle"), "bbox": mask.get("bbox"), "area": mask.get("area"),
                    "score": mask.get("score")})
    schema = pa.schema([*scores.schema, pa.field("rank", pa.int64()),
                        *(MASK_SCHEMA.field(n) for n in ("width", "height", "mask_rle", "bbox", "area", "score"))])
    return pa.Table.from_pylist(out, schema=schema)


def run_rank(options: RankOptions, log=print) -> pa.Table:
    started = time.perf_counter()
    concepts = read_concepts([options.concept], options.storage_options)
    if len(concepts) != 1:
        raise ValueError(f"{options.concept}: rank takes exactly one concept, found {len(concepts)}")
    fingerprint, feature_cache = prepare_job(options, concepts, log)
    urls = list(list_all_images(options))  # a ranking is global: every image's score is kept
    num_shards = commit.shard_count(len(urls), options.shard_size)
    if feature_cache is not None:  # follow the cache's sharding: one cache file per shard
        num_shards = feature_cache.adopt_layout(num_shards)
    cache = {"url": options.cache, "dtype": options.cache_dtype, "num_shards": num_shards} if options.cache else None
    spec = PipelineSpec(options.model_type, options.checkpoint, fingerprint, [concepts[0].to_json()], options.device,
                        options.num_actors, storage_options=options.storage_options, task="score", cache=cache,
                        precision=options.precision, fused_attention=options.fused_attention,
                        compile_encoder=options.compile_encoder, batch_size=options.batch_size,
                        chunk_size=options.chunk_size)
    import ray

    started_here = start_ray()  # one Ray for both passes
    try:
        return _rank(options, spec, concepts[0], urls, num_shards, started, log)
    finally:
        if started_here and local_cluster():
            ray.shutdown()


def _rank(options: RankOptions, spec: PipelineSpec, concept, urls: list[str], num_shards: int, started: float, log) -> pa.Table:
    results = run_pipeline(spec, _shards(urls, num_shards), _collect)
    scores = pa.concat_tables([r["table"] for r in results])
    encoded, hits = sum(r["encoded"] for r in results), sum(r["cache_hits"] for r in results)
    for problem in dict.fromkeys(p for r in results for p in r["problems"]):
        log(f"cache: {problem}")

    top = [r["image_uri"] for r in ranking_table(scores, None).to_pylist()[: options.top_k] if r["similarity"] is not None]
    masks = None
    if top:
        spec.task = "segment"
        masks = pa.concat_tables([r["table"] for r in run_pipeline(spec, _shards(top, num_shards), _collect)])
    ranking = ranking_table(scores, masks)

    fs, root = url_to_fs(options.output, **options.storage_options)
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(ranking, buffer, compression="zstd")
    commit.publish_bytes(fs, f"{root.rstrip('/')}/{RANKING_FILE}", buffer.getvalue())
    for row in ranking.to_pylist()[: min(options.top_k, 10)]:
        similarity = "n/a" if row["similarity"] is None else f"{row['similarity']:.4f}"
        log(f"  #{row['rank']:<3} {similarity:>6}  {row['image_uri']}")
    log(f"done: {ranking.num_rows} images ranked for {concept.name!r}, {encoded} encoded, {hits} from cache, "
        f"masks for the top {len(top)} -> {redact(options.output)}/{RANKING_FILE} in {time.perf_counter() - started:.1f} s")
    return ranking
