"""kernels"""

import os

# Triton 3.9 warns that FP fusion (a * b + c as one FMA) turns off by default in 3.10. Every kernel here was tuned and
# checked against its reference with fusion on, so it stays on unless the user chose otherwise (setdefault): one
# knob, read when a kernel compiles, for this process.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
