"""Export a trained run to ONNX: the whole scoring path in one graph, and a JSON of how to use it.

    python export.py checkpoint=results/memkd-st/demo/brick/best.pt [output=model.onnx] [image_size=N] [--debug]

See ``python export.py --help`` and README.md ("Deployment: ONNX"); the work is engine/export.py's.
"""
import sys

from engine.export import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
