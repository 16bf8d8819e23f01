"""Code that multi-rank tests run inside torchrun ranks (`helpers.torchrun_module`)."""
