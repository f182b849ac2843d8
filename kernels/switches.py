"""Environment switches of the kernels and the decode step (experiments and their A/B baselines): one registry
and one reader, so every switch treats an empty value as unset, refuses a typo instead of silently running the
default, and the CLI can check them all before it loads a model (``check_switches``). The README's Decode engine
table gives each switch's verdict; a test keeps it in step with ``SWITCHES``."""

from __future__ import annotations

import logging
import os

# name -> (accepted values, default)
SWITCHES: dict[str, tuple[tuple[str, ...], str]] = {
    "UNIQL_SPLITK_STEP": (("4", "8", "all"), "all"),
    "UNIQL_SSM_CONV_FOLD": (("0", "1"), "1"),
    "UNIQL_EARLY_LOADS": (("0", "1", "all"), "1"),
    "UNIQL_NARROW_SPLIT": (("wave", "deep"), "wave"),
    "UNIQL_HEAD_FOLD": (("0", "1"), "0"),
    "UNIQL_WIDE_COLS": (("128", "256", "auto"), "auto"),
    "UNIQL_GEMV_PER_SM": (("4", "8", "regs", "wide"), "wide"),
    "UNIQL_GEMV_BLOCK_K": (("32", "64"), "64"),
    "UNIQL_PDL": (("0", "1", "late"), "late"),
    "UNIQL_PDL_SSM": (("0", "1"), "1"),
    "UNIQL_GEMV_PRELOAD": (("0", "1", "2"), "1"),
    "UNIQL_GEMV_PIPE": (("0", "1", "rows"), "1"),
    "UNIQL_ROWS_PLAN": (("wave", "old"), "wave"),
    "UNIQL_SKINNY_PLAN": (("wave", "old"), "wave"),
    "UNIQL_ATTN_PREWAIT": (("0", "1"), "1"),
    "UNIQL_GLU_PAIRED": (("0", "1"), "1"),
    "UNIQL_SSM_GEMV_PRELOAD": (("0", "1", "2"), "0"),
    "UNIQL_HEAD_PRELOAD": (("0", "1", "2"), "0"),
    "UNIQL_GLU_PRELOAD": (("0", "1", "2"), "1"),
    "UNIQL_DEQUANT_CHUNK": (("32", "64", "128", "auto"), "auto"),
    "UNIQL_GEMV_STAGED": (("0", "1"), "0"),
}
# the other UNIQL_* variables the project reads (paths; an integer cap checked where it is read) or its deployment
# files set (deploy/uniql.service, docker-compose.yml: the checkpoint and extra flags of `uniql serve`)
OTHER_VARIABLES = ("UNIQL_CACHE_DIR", "UNIQL_DATA_DIR", "UNIQL_SSM_BLOCK_P", "UNIQL_CKPT", "UNIQL_ARGS")
log = logging.getLogger(__name__)


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of ``name`` (``default`` when unset or empty), which must be one of ``choices``."""
    raw = os.environ.get(name, "") or default
    if raw not in choices:
        allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise ValueError(f"{name} must be {allowed}, got {raw!r}")
    return raw


def switch(name: str) -> str:
    """The value of the registered switch ``name`` (its default when unset)."""
    choices, default = SWITCHES[name]
    return env_choice(name, choices, default)


def check_switches(strict: bool = False) -> list[str]:
    """Every registered switch's value (a typo raises ValueError); returns, and logs a warning for, the ``UNIQL_*``
    variables set that the project does not read (a misspelt switch name would otherwise be ignored). ``strict``
    (the benchmarks: an A/B under a misspelt switch would time the default): those raise ValueError too."""
    for name in SWITCHES:
        switch(name)
    unknown = sorted(name for name in os.environ
                     if name.startswith("UNIQL_") and name not in SWITCHES and name not in OTHER_VARIABLES)
    if strict and unknown:
        raise ValueError(f"{', '.join(unknown)} set, but UniQL reads no such variable "
                         f"(switches: {', '.join(SWITCHES)})")
    for name in unknown:
        log.warning("%s is set but UniQL reads no such variable (switches: %s)", name, ", ".join(SWITCHES))
    return unknown


def set_switches() -> dict[str, str]:
    """The ``UNIQL_*`` variables set (non-empty) in this process: a benchmark's results file records them, so a
    number taken under a switch is not read later as the default's."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("UNIQL_") and value}
