"""PerSAM / PerSAM-F over segment_anything's modules: pure torch + numpy.

Every concept of the paper lives in one module named after it:

    models      SAM registry (vit_h/l/b, tiny), weights loading, fingerprint
    preprocess  image -> encoder input exactly as SamPredictor; mask -> 64x64 grid
    concept     reference features -> Concept (target feature, target embedding)
    prior       similarity map, positive/negative points, attention bias
    decoder     SAM's mask decoder + target-guided attention + target-semantic prompt
    pairs       P (image, concept) pairs decoded together; size groups for full-res work
    persam      the training-free three-pass cascade (batched; one image = batch of one)
    persam_f    the two-weight fit and its cascade (batched)
    cascade     every pair of an encoder batch through its method's passes, presence,
                further instances as batched rounds; results leave the device once
    batch       EncodedBatch in, HostResults out (bit-packed masks, plain numpy)
    instances   presence threshold and several instances per image (one-image view)
    acceleration  fused attention, bf16/fp16 encoder, torch.compile (options)
    masks       COCO RLE, bbox, area
    metrics     IoU
    evaluation  PerSeg mIoU / boundary IoU, DAVIS J and F
    video       the reference's video mode (DAVIS)
    tiny_vit    MobileSAM's TinyViT image encoder (vit_t)
"""
