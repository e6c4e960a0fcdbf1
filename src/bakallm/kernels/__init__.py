"""Fast kernels, each with a pure-PyTorch reference beside it and a parity test.

The selective scan has four backends (reference.py, blocked.py, parallel.py, triton_scan.py);
scan.py picks one. Kept free of torch imports so that argument parsing can read the backend names.
"""

# "auto": the Triton scan on CUDA when triton imports and passes its self-check, else the
# log-depth (parallel) scan on CUDA; the blocked scan elsewhere.
SCAN_BACKENDS = ("auto", "triton", "parallel", "blocked", "reference")
