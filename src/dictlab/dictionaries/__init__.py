"""Learners that share the Dictionary interface; importing this package registers them all."""

from dictlab.dictionaries.base import Dictionary, load_dictionary
from dictlab.dictionaries.kmeans import KMeans, MiniBatchKMeans, ResidualKMeans, SphericalKMeans, fit_many
from dictlab.dictionaries.mixture import GaussianMixture, MixturePPCA
from dictlab.dictionaries.sae import SparseAutoencoder

__all__ = ["Dictionary", "GaussianMixture", "KMeans", "MiniBatchKMeans", "MixturePPCA", "ResidualKMeans",
           "SparseAutoencoder", "SphericalKMeans", "fit_many", "load_dictionary"]
