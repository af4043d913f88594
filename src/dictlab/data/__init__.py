"""The data every stage stands on: the corpus, language models and their hooked sites, activation
extraction into the store, paired text across tokenizers, files, processes and memory.
Imports nothing of dictlab but `errors` and `options`."""
