"""Score new images with a trained run: a heatmap overlay and a binary mask per image, and scores.csv.

    python predict.py checkpoint=results/memkd-st/demo/brick/best.pt input=path/to/image_or_folder \
        [output=folder] [threshold=normal|f1] [train.device=cpu] [eval.batch_size=8] [--debug]
    python predict.py backend=onnx model=results/memkd-st/demo/brick/best.onnx input=... [...]

See ``python predict.py --help`` and README.md ("Scoring new images"); the work is engine/inference.py's.
"""
import sys

from engine.inference import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
