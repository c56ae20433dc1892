"""`transformer-ln analyze curves` as a script (same arguments)."""
import sys

from transformer_ln.cli import run_command
from transformer_ln.evaluation.run_batch import analyze_main as main

if __name__ == "__main__":
    sys.exit(run_command(main, ["curves", *sys.argv[1:]]))
