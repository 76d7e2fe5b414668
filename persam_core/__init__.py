"""PerSAM / PerSAM-F over segment_anything's and sam2's modules: pure torch + numpy.

Every concept of the paper lives in one module named after it:

    families    the model-family registry: model types, builders, official checkpoints, capabilities,
                as_backbone (nothing else asks which family a model is)
    sam_family  SAM (vit_h/l/b), MobileSAM (vit_t), tiny;  sam2_family  SAM 2.1 (sam2.1_t/s/b+/l, tiny_sam2)
    models      any family: seeded random weights, safe state-dict loading, key checks, fingerprint
    sam2_models SAM 2.1 through sam2's own build_sam2 and hydra configs
    backbone    what the methods need from a model (encode, prompts, decode, upsample): the protocol
    sam_backbone   SAM's adapter, exactly as SamPredictor drives it
    sam2_backbone  SAM 2's, exactly as SAM2ImagePredictor drives it
    preprocess  image -> encoder input exactly as SamPredictor (and SAM 2's resize); mask -> 64x64 grid
    inputs      the input formats (resize, encoder outputs) families name (no model built)
    concept     reference features -> Concept (target feature, target embedding)
    prior       similarity map, positive/negative points, attention bias
    decoder     SAM's mask decoder + target-guided attention + target-semantic prompt
    decoder_sam2  SAM 2's own mask decoder with its transformer wrapped for the same guidance
    pairs       P (image, concept) pairs decoded together; size groups for full-res work
    persam      the training-free three-pass cascade (batched; one image = batch of one)
    persam_f    the two-weight fit and its cascade (batched)
    cascade     every pair of an encoder batch through its method's passes, presence,
                further instances as batched rounds; results leave the device once
    batch       EncodedBatch in, HostResults out (bit-packed masks, plain numpy)
    instances   presence threshold and several instances per image (one-image view)
    acceleration  fused attention, bf16/fp16 encoder, torch.compile, TF32; applies the decoder's (options)
    decoder_speed SAM's decoder eagerly, as CUDA graphs and/or compiled, fp32 or bf16 autocast (options)
    compile_cache the compiled encoder's cache key and torch's serialised artifacts (warm starts)
    masks       COCO RLE, bbox, area
    metrics     IoU
    evaluation  PerSeg mIoU / boundary IoU, DAVIS J and F
    video       the reference's video mode (DAVIS)
    tiny_vit    MobileSAM's TinyViT image encoder (vit_t)
    errors      how an error reads on one line (notes, error rows, the CLI)
"""
