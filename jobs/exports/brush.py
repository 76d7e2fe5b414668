"""Label Studio's brush RLE: the bytes `label_studio_sdk.converter.brush.mask2rle` writes
for an [H, W] uint8 mask (255 on the object), computed with numpy instead of the SDK's
bit-string loop. Byte-equal to the SDK's output (tests/exports/test_export_label_studio.py).

The format (rle-pack): a bit stream of a 32-bit value count (H * W * 4: the RGBA image,
every channel the mask value), the word size minus 1 (5 bits: 7), four run-length field
widths minus 1 (4 bits each: 3, 4, 8, 16 -> 2, 3, 7, 15), then one token per run of equal
values: `0 00 000 value` for a run of 1, `1 ii length-1 value` for longer runs with ii
the narrowest of the four widths that holds length-1; runs longer than 2^16 are split
into 2^16-long tokens first. The stream is padded with 1 to 8 zero bits (the SDK always
pads, even when the length is already a whole number of bytes).
"""

from __future__ import annotations

import numpy as np

CHANNELS = 4  # Label Studio masks are RGBA images: each pixel's value 4 times
HEADER = (32, 5, 4, 4, 4, 4)  # bit widths: value count, word size - 1, the four run-length field widths - 1
WORD_SIZE, RUN_FIELDS = 8, (3, 4, 8, 16)
LONGEST = 1 << 16  # longest run one token holds


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """flat: [N] uint8 -> (run lengths [R] int64, run values [R] uint8)."""
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    return np.diff(np.append(-1, ends)), flat[ends]


def _tokens(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs -> (token bits as integers [T] int64, token widths [T] int64), SDK order."""
    long = lengths > 256
    full = np.where(long, (lengths - 1) // LONGEST, 0)  # 2^16-long tokens before the rest
    rest = lengths - full * LONGEST
    # each run becomes `full` tokens of length 2^16 and one of length `rest`
    repeat = full + 1
    token_lengths = np.repeat(rest, repeat)
    first = np.cumsum(repeat) - repeat  # index of each run's first token
    is_full = np.ones(token_lengths.size, dtype=bool)
    is_full[first + full] = False
    token_lengths[is_full] = LONGEST
    token_values = np.repeat(values.astype(np.int64), repeat)
    token_long = np.repeat(long, repeat)
    # field index ii and width of the length field; a single value has flag 0 and field 0
    field = np.select([token_long, token_lengths > 16, token_lengths > 8], [3, 2, 1], 0)
    field_bits = np.asarray(RUN_FIELDS)[field]
    flag = ((token_lengths > 1) | token_long).astype(np.int64)  # 0: a single value (its length field is 0)
    length_field = token_lengths - 1
    widths = 1 + 2 + field_bits + WORD_SIZE
    bits = (((flag << 2 | field) << field_bits | length_field) << WORD_SIZE) | token_values
    return bits, widths


def _bit_stream(bits: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Integers of the given bit widths, most significant bit first -> [sum(widths)] uint8 bits."""
    owner = np.repeat(np.arange(widths.size), widths)
    position = np.arange(owner.size) - np.repeat(np.cumsum(widths) - widths, widths)
    return ((bits[owner] >> (widths[owner] - 1 - position)) & 1).astype(np.uint8)


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """mask: [H, W] bool (or uint8, used as is) -> Label Studio brush RLE bytes as ints
    (the `rle` of a brushlabels result); a bool mask is 255 on the object, as LS draws it."""
    values = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask.astype(np.uint8)
    lengths, run_values = _runs(values.reshape(-1))
    bits, widths = _tokens(lengths * CHANNELS, run_values)
    header = np.array([values.size * CHANNELS, WORD_SIZE - 1, *(w - 1 for w in RUN_FIELDS)], dtype=np.int64)
    stream = _bit_stream(np.concatenate([header, bits]), np.concatenate([np.asarray(HEADER), widths]))
    padded = np.concatenate([stream, np.zeros(8 - stream.size % 8, dtype=np.uint8)])
    return np.packbits(padded).tolist()
