"""How fast: encoder precision, fused attention, compile, TF32 (acceleration), the decoder's
speed paths (decoder_speed), the compiled encoder's warm-start cache (compile_cache), and the
torch-free flags every command shares (options)."""
