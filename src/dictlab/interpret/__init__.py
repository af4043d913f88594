"""What each unit means: top and sampled contexts, logit lens, coherence, explanations scored by
detection, feature splitting across widths and first-letter absorption; the interpretation stage.
Imports `measures`, `dictionaries` and `data` only; draws nothing (unit cards are in `report`)."""
