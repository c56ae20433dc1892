"""``python -m transformer_ln.data.bpe_process``: train the BPE in a fresh process (``store._train_tokenizer_file``).

It reads the pickled arguments of ``store._train_to_file`` from stdin (the dataset pickles as the paths of its
memory-mapped Arrow files) and writes ``tokenizer.json``. A module run by ``-m``, not ``multiprocessing``'s spawn,
so the caller's own script is never imported again in the child.
"""
import pickle
import sys

from .store import _train_to_file

if __name__ == "__main__":
    _train_to_file(*pickle.loads(sys.stdin.buffer.read()))
