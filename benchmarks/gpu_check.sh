#!/usr/bin/env bash
# Checks every fast path against its reference on a CUDA device, then measures celp18.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; no network needed
#
# 1. Parity on the device: the blocked selective scan against the sequential reference (a Mamba
#    block at the window shape, outputs, carried states and all gradients), the fused Elephant gate
#    against the plain formula (float32 and bfloat16), our XL attention through SDPA against
#    PyTorch's plain math attention. Optional kernels (mamba_ssm, flash_attn) are checked when they
#    import; one is only reported usable when its results with a carried state match ours.
# 2. Speed: one Mamba block and the Elephant gate against their peers, then celp18 training
#    (8 x 2048 tokens, bf16 autocast, torch.compile) and evaluation: tokens/s, peak memory, MFU
#    against the bf16 dense peak (989 TFLOP/s on H100/H200; measured on other GPUs).
#
# Without a CUDA device it runs the parity checks on the CPU and stops before the measurements.
# Budget: under 8 minutes: the stages' time limits add up to 460 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:benchmarks${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
MODELS=${GPU_CHECK_MODELS:-celp18}
status=0

if ! $PYTHON -c "import torch" 2>/dev/null; then
    echo "gpu_check: PyTorch does not import with '$PYTHON'; set PYTHON to an interpreter that has it." >&2
    exit 2
fi
DEVICE=$($PYTHON -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cpu ]; then
    echo "gpu_check: no CUDA device visible to PyTorch; running the parity checks on the CPU only."
fi

echo "== 1. Parity of the fast paths on $DEVICE"
timeout 90 $PYTHON - "$DEVICE" <<'PY' || status=1
import inspect
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bakallm.attention import XLAttention, xl_attention_mask
from bakallm.rotary import apply_rotary, rotary_tables
from bakallm.kernels.blocked import selective_scan
from bakallm.kernels.reference import selective_scan_reference
from bench_elephant import parity as elephant_parity
from bench_mamba import parity_check as mamba_parity

device = torch.device(sys.argv[1])
results = []  # (check, max abs diff, tolerance)


def record(name, difference, tolerance):
    results.append((name, difference, tolerance))


torch.manual_seed(0)
batch, length, d_inner, d_state = 2, 552, 64, 16
x, B, C = torch.randn(batch, length, d_inner, device=device), torch.randn(batch, length, d_state, device=device), torch.randn(batch, length, d_state, device=device)
dt = torch.rand(batch, length, d_inner, device=device) * 0.1
A, D = -torch.rand(d_inner, d_state, device=device) * 4, torch.randn(d_inner, device=device)
h0 = torch.randn(batch, d_inner, d_state, device=device)
y_ref, h_ref = selective_scan_reference(x, dt, A, B, C, D, h0)
y_fast, h_fast = selective_scan(x, dt, A, B, C, D, h0)
record("selective_scan vs reference, from a carried state (fp32)", max((y_fast - y_ref).abs().max().item(), (h_fast - h_ref).abs().max().item()), 1e-3)
record("Mamba block, fast vs reference scan (B=2, T=552, fp32)", mamba_parity(device, batch=2, length=552), 1e-3)
for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 4e-2)):
    record(f"Elephant gate, fused vs plain, relative ({dtype})", elephant_parity((552, 3072), device, dtype, 1.0, 8.0), tolerance)


def attention_outputs(backend, dtype):
    torch.manual_seed(0)
    attention = XLAttention(768, 12).to(device)
    batch, past, length = 4, 552, 552
    x = torch.randn(batch, length, 768, device=device, requires_grad=True)
    past_key, past_value = (torch.randn(batch, 12, past, 64, device=device) for _ in range(2))
    has_past = torch.tensor([True, False, True, False], device=device)
    mask = xl_attention_mask(has_past, past, length)
    cos, sin = rotary_tables(past + length, 64, 10000.0, device)
    with sdpa_kernel(backend), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        output, _, _ = attention(x, past_key, past_value, mask, cos, sin)
    grads = torch.autograd.grad(output.float().square().mean(), [x, *attention.parameters()])
    return [output.float(), *grads]


def flash_attention_check(flash_attn_func):
    """With every row carrying a past, XL attention is causal attention aligned to the last key."""
    torch.manual_seed(0)
    attention = XLAttention(768, 12).to(device)
    batch, past, length = 2, 552, 552
    x = torch.randn(batch, length, 768, device=device)
    past_key, past_value = (torch.randn(batch, 12, past, 64, device=device) for _ in range(2))
    cos, sin = rotary_tables(past + length, 64, 10000.0, device)
    mask = xl_attention_mask(torch.ones(batch, dtype=torch.bool, device=device), past, length)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        expected, _, _ = attention(x, past_key, past_value, mask, cos, sin)
        query, key, value = attention.qkv(x).view(batch, length, 3, 12, 64).permute(2, 0, 3, 1, 4)
        keys = apply_rotary(torch.cat((past_key.to(key.dtype), key), dim=2), cos, sin)
        values = torch.cat((past_value.to(value.dtype), value), dim=2)
        query = apply_rotary(query, cos[past:], sin[past:])
        attended = flash_attn_func(*(t.transpose(1, 2).bfloat16() for t in (query, keys, values)), causal=True)
        got = attention.out(attended.reshape(batch, length, 768))
    difference = (got.float() - expected.float()).abs().max().item()
    if difference < 5e-2:
        return f"XL attention with a carried past matches (max abs diff {difference:.2e}); the model keeps SDPA, which also covers rows without a past"
    return f"XL attention with a carried past does NOT match (max abs diff {difference:.2e}): not used"


fast_backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.FLASH_ATTENTION]
for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    reference = attention_outputs([SDPBackend.MATH], dtype)
    fast = attention_outputs(fast_backends, dtype)
    record(f"XL attention, SDPA vs plain math ({dtype})", max((f - r).abs().max().item() for f, r in zip(fast, reference)), tolerance)

# Optional kernels: only usable when they reproduce a state carried between two windows.
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    print("mamba_ssm: not installed, not used.")
else:
    if not any("state" in name and "last" not in name for name in inspect.signature(selective_scan_fn).parameters):
        print("mamba_ssm: selective_scan_fn takes no initial state, so it cannot carry the SSM state between windows: not used.")
    else:
        print(f"mamba_ssm: selective_scan_fn{inspect.signature(selective_scan_fn)} has an initial-state argument; wire and check it before use.")
try:
    from flash_attn import flash_attn_func
except ImportError:
    print("flash_attn: not installed, not used.")
else:
    try:
        print(f"flash_attn: {flash_attention_check(flash_attn_func)}.")
    except Exception as error:  # an optional kernel must not stop the other checks
        print(f"flash_attn: check failed ({error!r}): not used.")

width = max(len(name) for name, _, _ in results)
failed = False
for name, difference, tolerance in results:
    ok = difference <= tolerance
    failed |= not ok
    print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  difference {difference:.2e} (tolerance {tolerance:.0e})")
sys.exit(1 if failed else 0)
PY

if [ "$DEVICE" = cpu ]; then
    echo "gpu_check: stopping before the GPU measurements (no CUDA device)."
    exit $status
fi

PEAK=$($PYTHON -c "import torch; name = torch.cuda.get_device_name(); print(989 if ('H100' in name or 'H200' in name) else 0)")

echo "== 2a. One Mamba block, forward + backward, against its peers"
# Also larger scan blocks and sub-chunks: fewer, larger kernels, the trade a GPU may prefer.
timeout 90 $PYTHON benchmarks/bench_mamba.py --device cuda --repeats 10 --scan-sizes 184 12 --scan-sizes 276 16 || status=1
echo "== 2b. Elephant gate, fused against plain"
timeout 40 $PYTHON benchmarks/bench_elephant.py --device cuda --repeats 20 || status=1
echo "== 2c. Training and evaluation, 8 x 2048 tokens, bf16 autocast, torch.compile"
timeout 240 $PYTHON benchmarks/bench_train.py --device cuda --models $MODELS --batch-size 8 --ctx 2048 \
    --dtype bfloat16 --compile --eval --steps 5 --peak-tflops "$PEAK" || status=1
exit $status
