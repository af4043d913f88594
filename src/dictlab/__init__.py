"""dictlab: dictionaries (k-means, mixtures, sparse autoencoders) over language-model activations."""

__version__ = "0.1.0"
