"""Fast kernels, each with a pure-PyTorch reference beside it and a parity test.

The selective scan has three backends (reference.py, blocked.py, triton_scan.py); scan.py picks
one. Kept free of torch imports so that argument parsing can read the backend names.
"""

# "auto": the Triton scan on CUDA when triton imports, the blocked scan elsewhere.
SCAN_BACKENDS = ("auto", "triton", "blocked", "reference")
