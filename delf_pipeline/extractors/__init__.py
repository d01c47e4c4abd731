"""Feature extractors: RootSIFT (embedded), DELF/DELG SavedModels and TF Hub, EfficientNet-Lite0 (ImageNet)."""
