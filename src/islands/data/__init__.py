"""Corpora and partitioners (iid, Dirichlet non-IID, by source)."""

from islands.data.corpus import Document, TextDataConfig, from_hf_dataset, load_documents
from islands.data.partition import ByteData, partition

__all__ = ["ByteData", "Document", "TextDataConfig", "from_hf_dataset", "load_documents",
           "partition"]
