"""Test helper process: take GPU memory until the device's free memory drops to a target, hold it, give it back.

Bounded and self-limiting: never more than CAP bytes, never longer than HOLD seconds; everything is released when
the process exits (stdin closed by the test, or the hold time over), since the memory dies with its context.
The caching allocator is off (set before torch loads), so every chunk is one exact cudaMalloc and the driver's
free memory moves by the chunk.
Usage: python cuda_memory_hog.py TARGET_FREE_BYTES CAP_BYTES HOLD_S [DEVICE_INDEX]
"""

import os
import select
import sys

os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"

import torch  # noqa: E402

CHUNK = 4 << 20


def main() -> None:
    target, cap, hold_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    index = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.cuda.init()  # the context first: its own memory is part of what the loop measures
    chunks = []
    while torch.cuda.mem_get_info(index)[0] > target and len(chunks) * CHUNK < cap:
        chunks.append(torch.ones(CHUNK, dtype=torch.uint8, device=f"cuda:{index}"))  # written, so really held
    torch.cuda.synchronize(index)
    print("READY", len(chunks) * CHUNK, torch.cuda.mem_get_info(index)[0], flush=True)
    select.select([sys.stdin], [], [], hold_s)  # until the test closes our stdin, or the hold time ends


if __name__ == "__main__":
    main()
