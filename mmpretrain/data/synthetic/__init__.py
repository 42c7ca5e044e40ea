"""The bundled data sets, made locally: ``digits`` (scikit-learn), ``spoken_digits`` (espeak-ng),
``scenes`` (drawn shapes with captions and hard negatives), ``moving_digits`` (mp4 clips with speech)
and ``digits_classifier`` (a supervised backbone for LiT).

May import ``data.stream``, ``data.convert`` and ``towers``.
"""
