"""The dataset layouts the config may name: plain Python, so the configuration checks a value and
answers ``--help`` without loading torch. datasets/build.py reads each of them."""
from __future__ import annotations

DATASET_NAMES: tuple[str, ...] = ("mvtec", "visa", "mpdd", "mvtec3d", "eyecandies", "btad", "mvtec_loco", "mvtec_ad2",
                                  "folder", "demo")
