"""MemKD with a reverse-distillation (RD4AD) student: a decoder rebuilding teacher features.

    python trainRM_RD.py [override.yaml ...] [section.key=value ...]
memory.enabled=false gives the plain RD4AD baseline. See README.md for every key.
"""
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main("rd", sys.argv[1:]))
