"""What is learned: the frozen teacher, the two students, the NR memory, losses and anomaly maps.

    from models.build import build_model      # a MemKD model from run settings
    from models.registry import BACKBONES     # names only, no torch: what the config may choose

This package's own namespace stays empty so that importing :mod:`models.registry` loads no torch.
"""
