"""The CPU stage before the model actor: read, hash, decode and resize one chunk.

Per image, in this order: read the bytes of a regular file, at most --max-image-bytes (a
failure, a FIFO, a device, a directory, a file over the limit or a name that is not UTF-8
is an error row, the job goes on),
hash them (SHA-256 of the content), and then
- same URL and content as good rows (one per concept of the run) of the shard's previous
  commit -> carried: its rows are copied by the committer, nothing is computed;
- features in the cache -> shipped to the actor, which skips the encoder;
- otherwise decoded (EXIF, RGB, pixel limit) and resized for the model's encoder
  (persam_core.modeling.inputs: SAM's longest side to 1024 in uint8, SAM 2's 1024 x 1024 float32).
Only the frames the job's methods read are made (persam_core.methods.frames): the model's
frame above (cached or resized), and for GF-SAM concepts the 1024 x 1024 stretch frame
(decoded even when the model frame came from the cache; never cached itself: its SAM
features and DINOv2 tokens are, or its tokens alone for a pass that reads no SAM features).
"""

from __future__ import annotations

from persam_core.errors import describe
from persam_core.methods.frame_resize import frame_resize
from persam_core.methods.registry import FRAME_MODEL, FRAME_STRETCH

from jobs.pipeline.cache import content_sha256
from jobs.pipeline.job import PreparedJob
from jobs.storage.redaction import scrub, secrets_in
from jobs.storage.images import decode_image
from jobs.storage.files import NotAFileError, read_file_bytes
from jobs.storage.listing import UNREADABLE
from jobs.pipeline.payload import Chunk, ChunkItem, pack_chunk
from jobs.storage.schema import good_images


def prepare_chunk(row: dict, job: PreparedJob) -> dict:
    """{"shard", "chunk", "urls", "previous", "sources"} -> {"shard", "chunk", "meta", "arrays"} (see
    payload.py). `urls` are the images' credential-free names (rows, hashing, cache);
    `sources` maps those whose reading URL holds credentials to that URL, used only here."""
    storage_options, max_pixels = job.spec.storage_options, job.spec.max_pixels
    frames = job.frames()
    # no concept (a job that only checks its inputs): the model's own frame, so bad images still show
    model_frame, stretch = FRAME_MODEL in frames or not frames, FRAME_STRETCH in frames
    cache = job.cache() if model_frame else None
    resize = frame_resize(FRAME_MODEL, job.spec.model.model_type)
    resize_stretch = frame_resize(FRAME_STRETCH, job.spec.model.model_type)
    urls = list(row["urls"])
    # unchanged: good rows for every concept this run computes (a new concept has none)
    labels, previous = job.labels(), list(row.get("previous") or [])
    unchanged_for: dict[tuple[int, ...], set] = {}  # per set of concepts (several with `pairs`)

    def unchanged(url: str, sha256: str) -> bool:
        chosen = job.concepts_for(url)
        if chosen not in unchanged_for:
            unchanged_for[chosen] = good_images(previous, storage_options, [labels[k][0] for k in chosen])
        return (url, sha256) in unchanged_for[chosen]

    items, data = [], {}
    sources = dict(row.get("sources") or {})
    for index, url in enumerate(urls):
        item = ChunkItem(url)
        items.append(item)
        source = sources.get(url, url)
        if source == UNREADABLE:
            item.error = f"read failed: {url}: file name is not valid UTF-8 (its bytes shown as \\xNN); rename the file"
            continue
        try:
            data[index] = read_file_bytes(source, storage_options, job.spec.max_image_bytes, shown=url)
        except NotAFileError as error:  # names the image as stored (no credentials)
            item.error = f"read failed: {error}"
            continue
        except Exception as error:  # missing object, permission, timeout: the job goes on
            # a library's message may quote the URL it read, signature included
            item.error = scrub(f"read failed: {describe(error)}", secrets_in([source]))
            continue
        item.sha256 = content_sha256(data[index])
        item.carried = unchanged(url, item.sha256)
    wanted = {item.sha256 for item in items if item.sha256 and not item.carried}
    cached, problems = cache.load(urls, wanted) if cache is not None and wanted else ({}, [])
    # a pass that reads DINOv2 alone (rank's presence) caches tokens only, under DINOv2's fingerprint
    tokens_only = not job.needs_sam()
    stretch_cache = (job.token_cache() if tokens_only else job.stretch_cache()) if stretch else None
    cached_stretch, more = stretch_cache.load(urls, wanted) if stretch_cache is not None and wanted else ({}, [])
    chunk = Chunk(int(row["shard"]), int(row["chunk"]), items, tuple(problems + more))
    for index, item in enumerate(items):
        if item.error is not None or item.carried:
            continue
        entry, stretched_entry = cached.get(item.sha256), cached_stretch.get(item.sha256)
        resized = stretched = None
        if (model_frame and entry is None) or (stretch and stretched_entry is None):
            try:
                image = decode_image(data.pop(index), item.url, max_pixels)
                resized = resize(image) if model_frame and entry is None else None
                stretched = resize_stretch(image) if stretch and stretched_entry is None else None
            except Exception as error:
                item.error = f"decode failed: {describe(error)}"
                continue
        # source: "cached" when the frame the encoder skips came from the cache (the model's
        # frame where the job reads it, else the stretch frame), else "pixels"
        first = entry if model_frame else stretched_entry
        item.source = "cached" if first is not None else "pixels"
        for made in (stretched_entry, stretched, entry, resized):  # the model frame's sizes win
            if made is not None:
                item.input_size, item.original_size = made.input_size, made.original_size
        if entry is not None:
            chunk.features[index] = entry.features
            if entry.high_res:
                chunk.high_res[index] = entry.high_res
        if resized is not None:
            chunk.pixels[index] = resized.pixels
        if stretched_entry is not None and tokens_only:
            chunk.stretch_tokens[index] = stretched_entry.features
        elif stretched_entry is not None:
            chunk.stretch_features[index], chunk.stretch_tokens[index] = stretched_entry.features, stretched_entry.high_res[0]
        if stretched is not None:
            chunk.stretch[index] = stretched.pixels
    meta, arrays = pack_chunk(chunk)
    return {"shard": chunk.shard, "chunk": chunk.index, "meta": meta, "arrays": arrays}
