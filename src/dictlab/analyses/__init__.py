"""The learned directions put to work: co-activation graphs, steering and ablation, and cross-model
convergence (behaviour, representations, dictionary units). Imports `interpret`, `measures`,
`dictionaries` and `data`; draws nothing (its figures are in `report`)."""
