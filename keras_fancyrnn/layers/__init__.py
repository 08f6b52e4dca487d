"""The layers and their cells: ``cell`` (RecurrentCell, the cell contract), ``base`` (RNN, the
layer), ``simple_rnn``, ``lstm``, ``gru`` (step equations and Keras layers), ``bidirectional`` and
``stacked`` (the composite layers, with what they share in ``wrappers``), ``initializers``
(ChronoBias) and ``gpu`` (the ``use_cudnn`` argument). Public names are exported by
``keras_fancyrnn``."""
