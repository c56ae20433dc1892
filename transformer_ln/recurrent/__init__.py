"""The layer normalization paper's own setting (Ba, Kiros and Hinton 2016): LN-LSTM and LN-RNN cells (``rnn``), a
word-level LSTM language model on the built-in corpus (``lm``) and the study tables and figures (``study``)."""
