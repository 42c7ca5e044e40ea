"""Other tools' formats in and out: open_clip's checkpoint layouts and directory (``open_clip``),
TorchScript encoders (``torchscript``).

May import only :mod:`mmpretrain.io` of ours, so towers can use it.
"""
