"""Environment switches of the kernels and the decode step (experiments and their A/B baselines): one reader, so
every switch treats an empty value as unset and refuses a typo instead of silently running the default."""

from __future__ import annotations

import os


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of ``name`` (``default`` when unset or empty), which must be one of ``choices``."""
    raw = os.environ.get(name, "") or default
    if raw not in choices:
        allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise ValueError(f"{name} must be {allowed}, got {raw!r}")
    return raw


def set_switches() -> dict[str, str]:
    """The ``UNIQL_*`` variables set (non-empty) in this process: a benchmark's results file records them, so a
    number taken under a switch is not read later as the default's."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("UNIQL_") and value}
