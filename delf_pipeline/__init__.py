"""delf_pipeline: landmark recognition and retrieval with local features (ImageNet
EfficientNet-Lite0 by default; XFeat, RootSIFT, DELF/DELG) and geometric re-ranking, as staged
batch jobs (extract, shortlist, rerank, predict, evaluate).

Nothing heavy happens at import time: TensorFlow is imported only by the backends that
need it, when they are used.
"""
__version__ = "0.1.0"
