"""Gradient clipping: ``clipping`` holds the pure clip functions, ``ClippingOptimizer`` and
``ClippingStats`` (exported by ``keras_fancyrnn``)."""
