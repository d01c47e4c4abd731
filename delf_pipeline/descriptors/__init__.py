"""Global-descriptor maths: pooling of feature maps, whitening, query expansion and
database-side augmentation. Pure NumPy functions on arrays; no file or store access."""
