"""`persam export KIND`: the mask Parquet of `persam segment` -> files that labelling,
training and review tools import. Every kind streams: the masks are read one shard (one
part file, or the part files of one shard number across concept partitions) at a time,
so memory stays bounded whatever the dataset's size; every file is written to any fsspec
URL atomically (temp file + rename locally, one upload on object stores).

    rows.py          the masks dataset, shard by shard; foreign Parquet files skipped with a line
    sink.py          where an export writes: one streamed file, or files in a folder
    images.py        where the images are now (--images), their names under --image-root,
                     reading them with missing and changed images reported, not fatal
    names.py         file names derived from data that cannot leave their folder
    coco.py          COCO instances JSON (pycocotools, COCOeval, CVAT "COCO 1.0", FiftyOne)
    brush.py         Label Studio's brush RLE
    label_studio.py  Label Studio tasks with brush pre-annotations + a labelling config
    hf_dataset.py    a Hugging Face `datasets` Parquet layout with a dataset card
    drawing.py       mask overlays drawn with torchvision.utils
    gallery.py       the review gallery (thumbnails, full-size overlays, captions)
    subjects.py      masked subject crops (RGBA PNG + white-background JPEG)
"""

# The export kinds, as the CLI offers them (jobs/export.py dispatches on these names).
EXPORT_KINDS = ("coco", "label-studio", "hf-dataset", "overlays", "subjects")
