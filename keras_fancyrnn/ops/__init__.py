"""The C++ kernels (``kernels/``) and ``native``: their build, load, Python wrappers and
gradients."""
