"""Learners that share the Dictionary interface; importing this package registers them all."""

from dictlab.dictionaries.base import Dictionary, load_dictionary
from dictlab.dictionaries.kmeans import KMeans

__all__ = ["Dictionary", "KMeans", "load_dictionary"]
