"""Which block sizes the online Hadamard rotation (rotation.py) may use, without torch: the run configuration
checks it in processes that never load a model (verify's graph checks)."""


def valid_block(block: int) -> bool:
    """A power of 4: 1 / sqrt(block) is then a power of two and the normalised Hadamard matrix is exact in FP16."""
    return block >= 4 and block & (block - 1) == 0 and (block.bit_length() - 1) % 2 == 0
