"""Input pipelines: everything between files on disk and augmented crops.

Nothing here imports sslscale; the `data:` config section (DataConfig) is the only thing passed in.
"""
from data_pipelines.batch import Batch

__all__ = ["Batch"]
