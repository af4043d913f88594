"""The structure DESIGN.md asks for, beside `lint-imports` (the layers, no cycles, only report draws):
no learner's name outside dictionaries/, and no module over 450 lines."""

import re
from pathlib import Path

from dictlab.dictionaries import LEARNERS

SOURCE = Path(__file__).parents[1] / "src" / "dictlab"


def test_no_method_name_outside_the_dictionaries_package():
    names = "|".join(re.escape(m) for m in LEARNERS)
    quoted = re.compile(rf"""["']({names})["']""")
    found = [f"{path.relative_to(SOURCE)}:{n}: {line.strip()}" for path in SOURCE.rglob("*.py")
             if "dictionaries" not in path.parts for n, line in enumerate(path.read_text().splitlines(), 1)
             if quoted.search(line)]
    assert found == []


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(SOURCE)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
