"""Fast kernels, each with a pure-PyTorch reference beside it and a parity test.

The selective scan has five backends (reference.py, blocked.py, parallel.py, triton_scan.py and
cpu_scan.py with its C++ source); scan.py picks one. cpu_fused.py gives the model's modules fused
CPU passes (C++, built with the CPU scan by cpu_build.py) beside their PyTorch operations. Kept
free of torch imports so that argument parsing can read the backend names.
"""

# "auto": the Triton scan on CUDA when triton imports and passes its self-check, else the
# log-depth (parallel) scan on CUDA; on a CPU the compiled C++ scan ("cpu") when it builds and
# passes its self-check, else the blocked scan.
SCAN_BACKENDS = ("auto", "triton", "cpu", "parallel", "blocked", "reference")
