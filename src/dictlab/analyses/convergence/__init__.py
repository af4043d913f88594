"""`dictlab converge`: do two models learn the same things? Behaviour, every layer pair's
representations and dictionary units, each beside a permutation null (run.py chains them)."""
