"""The one interface every learner shares (base.py), every learner with its `fit:` options (learner.py:
each registers itself by `method`), SAE training, and the formats of published SAEs.
Imports `data` only. Importing this package registers every learner, in the order listed here."""

# isort: skip_file

from dictlab.dictionaries.base import Dictionary, load_dictionary
from dictlab.dictionaries.learner import LEARNERS, FitSpec, Learner
from dictlab.dictionaries.kmeans import KMeans, KMeansFit, SphericalKMeans, SphericalKMeansFit, fit_many
from dictlab.dictionaries.minibatch_kmeans import MiniBatchKMeans, MiniBatchKMeansFit
from dictlab.dictionaries.residual_kmeans import ResidualKMeans, ResidualKMeansFit
from dictlab.dictionaries.gmm import GaussianMixture, GMMFit
from dictlab.dictionaries.mppca import MixturePPCA, MPPCAFit
from dictlab.dictionaries.baselines import LinearBasis, NeuronsFit, PCAFit
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.dictionaries.sae_fit import SAEFit
from dictlab.dictionaries.pretrained import PretrainedFit

__all__ = ["LEARNERS", "Dictionary", "FitSpec", "GMMFit", "GaussianMixture", "KMeans", "KMeansFit", "Learner",
           "LinearBasis", "MPPCAFit", "MiniBatchKMeans", "MiniBatchKMeansFit", "MixturePPCA", "NeuronsFit", "PCAFit",
           "PretrainedFit", "ResidualKMeans", "ResidualKMeansFit", "SAEFit", "SparseAutoencoder", "SphericalKMeans",
           "SphericalKMeansFit", "fit_many", "load_dictionary"]
