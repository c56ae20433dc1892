"""Decoding and scoring a trained translation model: beam search with a key/value cache (``search``) and
sacreBLEU/chrF evaluation and the ``translate``/``evaluate`` commands (``evaluate``)."""
