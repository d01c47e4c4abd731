"""Training a global descriptor on labelled photos (the core of ``delf-pipeline train``).

- :mod:`.data`: the labelled examples, the validation split (by image, optionally by place),
  the images decoded once into memory, and each epoch's plan drawn from (seed, epoch);
- :mod:`.augment`: random resized crop, small rotation, colour (NumPy and PIL, seeded);
- :mod:`.model`: EfficientNet-Lite + GeM (learnable p) -> linear -> BatchNorm -> L2;
- :mod:`.losses`: sub-center ArcFace with dynamic margins, plain ArcFace;
- :mod:`.validation`: mAP@100, top-1 and GAP of held-out images against the rest;
- :mod:`.loop`: the epochs, checkpoints written atomically, bit-exact resume, early stopping;
- :mod:`.export`: the DELG SavedModel (the signature every stage reads) and its model card.

Nothing here imports a stage module; ``delf_pipeline.train`` is the job that calls it.
"""
