"""What a dictionary is scored on: reconstruction and cluster metrics, the model's loss with a
reconstruction spliced in, statistics (intervals, permutation tests, FDR) and similarity measures.
Imports `dictionaries` and `data` only."""
