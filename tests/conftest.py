"""Hypothesis profiles: `default` for every run, `fuzz` (HYPOTHESIS_PROFILE=fuzz) for a long
search. Property tests size their runs with `examples(n)`, which the fuzz profile multiplies.
"""

from __future__ import annotations

import os
from typing import Final

from hypothesis import settings

FUZZ_FACTOR: Final = 50

settings.register_profile("default", settings())
settings.register_profile("fuzz", settings(deadline=None, print_blob=True))
PROFILE: Final = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """`n` examples in the default profile, `FUZZ_FACTOR` times as many when fuzzing."""
    return n * FUZZ_FACTOR if PROFILE == "fuzz" else n
