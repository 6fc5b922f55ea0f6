"""MemKD with an STPM student: a copy of the teacher network, trained from scratch.

    python trainRM_ST.py [override.yaml ...] [section.key=value ...]
memory.enabled=false gives the plain STPM baseline. See README.md for every key.
"""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main("st", sys.argv[1:]))
