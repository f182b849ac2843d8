"""Test helper process: take host RAM until available memory drops to a target, hold it, give it all back.

Bounded and self-limiting: never more than CAP bytes, never longer than HOLD seconds, and everything is released
when the process exits (stdin closed by the test, or the hold time over).
Usage: python memory_hog.py TARGET_AVAILABLE_BYTES CAP_BYTES HOLD_S
"""

import select
import sys

import psutil

CHUNK = 16 << 20


def main() -> None:
    target, cap, hold_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    chunks = []
    while psutil.virtual_memory().available > target and len(chunks) * CHUNK < cap:
        chunks.append(bytearray(b"\x01") * CHUNK)  # filled, so every page is really resident
    print("READY", len(chunks) * CHUNK, psutil.virtual_memory().available, flush=True)
    select.select([sys.stdin], [], [], hold_s)  # until the test closes our stdin, or the hold time ends


if __name__ == "__main__":
    main()
