"""Data for training and evaluation: tokenizers, built-in corpora, dataset loading and packing."""

from .corpora import BUILTIN_CORPORA, builtin_documents
from .datasets import load_documents, pack_documents
from .tokenizer import BYTE_TOKENIZER, load_tokenizer

__all__ = ["BUILTIN_CORPORA", "BYTE_TOKENIZER", "builtin_documents", "load_documents", "load_tokenizer",
           "pack_documents"]
