"""Integer, bit and sparse packing formats shared by techniques, runtimes and measurement."""
