"""The layers and their cells: ``base`` (RecurrentCell, RNN), ``simple_rnn``, ``lstm``, ``gru``
(step equations and Keras layers), ``wrappers`` (Bidirectional, StackedRNN), ``initializers``
(ChronoBias) and ``gpu`` (the ``use_cudnn`` argument). Public names are exported by
``keras_fancyrnn``."""
