"""Global-descriptor maths (pooling of feature maps, whitening, query expansion, database-side
augmentation) and the derived index stores they make (:mod:`.derived`)."""
