#!/usr/bin/env bash
# Checks every fast path against its reference on a CUDA device, then measures celp18.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; no network needed
#
# 1. Parity on the device: the blocked and (on CUDA) Triton selective scans against the sequential
#    reference (the scan alone in float32 and from bfloat16 inputs, and a Mamba block at the window
#    shape: outputs, carried states and all gradients), the chunked cross-entropy against
#    F.cross_entropy, flash-linear-attention's fused_recurrent_hgrn as a flattened Mamba scan (when
#    `fla` imports; it is a speed peer in stage 2a), the fused Elephant gate
#    against the plain formula (float32 and bfloat16), our XL attention through SDPA against
#    PyTorch's plain math attention. Optional kernels (mamba_ssm, flash_attn) are checked when they
#    import; one is only reported usable when its results with a carried state match ours.
# 2. Speed: one Mamba block (Triton, blocked, mambapy) and the scan alone (Triton at its default
#    and four other sizes, blocked, fla, and a copy of as many bytes as the scan reads and writes:
#    the memory floor) and the Elephant gate against their peers, then celp18 training (8 x 2048
#    tokens, bf16 autocast, torch.compile, the Triton scan) and evaluation: tokens/s, peak memory,
#    MFU against the bf16 dense peak (989 TFLOP/s on H100/H200; measured on other GPUs), the
#    projected time of one WikiText-103 epoch (~120M tokens), the host synchronisations in one
#    training step; then one 1M-token document evaluated window by window, without and with the
#    order-3 document cache.
#
# Without a CUDA device it runs the parity checks on the CPU and stops before the measurements.
# Budget: under 8 minutes: the stages' time limits add up to 470 s.
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
# Under a minute on a GPU; a loaded CPU can need several minutes for the same checks.
PARITY_LIMIT=$([ "$DEVICE" = cuda ] && echo 60 || echo 900)
timeout $PARITY_LIMIT $PYTHON - "$DEVICE" <<'PY' || { echo "gpu_check: parity stage failed or ran past ${PARITY_LIMIT} s." >&2; status=1; }
import inspect
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bakallm.model.attention import XLAttention, xl_attention_mask
from bakallm.model.rotary import apply_rotary, rotary_tables
import torch.nn.functional as F

from bakallm.errors import UserError
from bakallm.kernels.cross_entropy import linear_cross_entropy
from bakallm.kernels.reference import selective_scan_reference
from bakallm.kernels.scan import resolve_scan_backend, selective_scan
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
inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]


def scan_results(backend, dtype=torch.float32):
    """Outputs and every gradient (the loss also reaches the inputs through the final state)."""
    cast = [t.detach().to(dtype).requires_grad_() for t in inputs]
    y, h = selective_scan(*cast, backend=backend)
    weights = torch.linspace(-1, 1, d_inner, device=device)
    gradients = torch.autograd.grad((y.float() * weights).sum() + (h.float() * weights[:, None]).sum(), cast)
    return [y.float(), h.float(), *(g.float() for g in gradients)]


def relative_difference(got, want):
    return max(((g - w).abs().max() / w.abs().max().clamp(min=1e-6)).item() for g, w in zip(got, want))


reference = scan_results("reference")
record("blocked scan vs reference, outputs and gradients, from a carried state (fp32, relative)", relative_difference(scan_results("blocked"), reference), 1e-4)
try:
    triton_ready = resolve_scan_backend("triton", device) == "triton"
except UserError as error:
    print(f"Triton scan: not checked ({error})")
    triton_ready = False
if triton_ready:
    record("triton scan vs reference, outputs and gradients, from a carried state (fp32, relative)", relative_difference(scan_results("triton"), reference), 1e-4)
    record("triton scan from bf16 inputs vs reference (relative)", relative_difference(scan_results("triton", torch.bfloat16), reference), 5e-2)
    record("Mamba block, triton vs reference scan (B=2, T=552, fp32)", mamba_parity(device, batch=2, length=552, backend="triton"), 1e-3)
record("Mamba block, blocked vs reference scan (B=2, T=552, fp32)", mamba_parity(device, batch=2, length=552), 1e-3)

# celp18's head (a 50K vocabulary padded to 50304) over 4096 tokens on CUDA; smaller on the CPU.
tokens, vocab, padded_vocab = (4096, 50277, 50304) if device.type == "cuda" else (300, 4000, 4096)
hidden = torch.randn(tokens, 768, device=device, requires_grad=True)
head = (torch.randn(padded_vocab, 768, device=device) * 0.02).requires_grad_()
labels = torch.randint(0, vocab, (tokens,), device=device)
labels[::7] = -100
want_loss = F.cross_entropy(F.linear(hidden, head[:vocab]), labels, ignore_index=-100, reduction="sum")
want_grads = torch.autograd.grad(want_loss, (hidden, head))
got_loss = linear_cross_entropy(hidden, head, labels, vocab, chunk_tokens=1024 if device.type == "cuda" else 128)
got_grads = torch.autograd.grad(got_loss, (hidden, head))
record("chunked cross-entropy vs F.cross_entropy, loss and gradients (fp32, relative)", relative_difference([got_loss, *got_grads], [want_loss, *want_grads]), 1e-4)

try:
    from fla.ops.hgrn import fused_recurrent_hgrn
except ImportError:
    print("fla: not installed, fused_recurrent_hgrn not checked.")
else:
    try:
        flat_x = ((dt * x).unsqueeze(-1) * B.unsqueeze(2)).flatten(2)
        flat_g = (dt.unsqueeze(-1) * A).flatten(2)
        states, h_last = fused_recurrent_hgrn(flat_x.detach(), flat_g.detach(), initial_state=h0.detach().flatten(1), output_final_state=True)
        y_fla = (states.view(batch, length, d_inner, d_state) * C.unsqueeze(2)).sum(-1) + D * x
        record("fla fused_recurrent_hgrn as a flattened Mamba scan vs reference (relative)", relative_difference([y_fla.detach(), h_last.view_as(h0)], reference[:2]), 1e-3)
    except Exception as error:  # an optional peer must not stop the other checks
        print(f"fla: fused_recurrent_hgrn check failed ({error!r}): not used.")
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

echo "== 2a. One Mamba block and the selective scan alone, forward + backward, against their peers"
# Also larger blocked-scan blocks and sub-chunks: fewer, larger kernels, the trade a GPU may prefer;
# and the Triton scan at other tile lengths, channels per program and warps, to tune its defaults.
timeout 120 $PYTHON benchmarks/bench_mamba.py --device cuda --repeats 10 --skip-slow-peers --scan-table \
    --scan-sizes 276 16 --triton-configs 8:16:4 32:8:8 16:32:8 16:8:4 || status=1
echo "== 2b. Elephant gate, fused against plain"
timeout 30 $PYTHON benchmarks/bench_elephant.py --device cuda --repeats 20 || status=1
echo "== 2c. Training and evaluation, 8 x 2048 tokens, bf16 autocast, torch.compile, scan auto (triton)"
timeout 200 $PYTHON benchmarks/bench_train.py --device cuda --models $MODELS --batch-size 8 --ctx 2048 \
    --dtype bfloat16 --compile --eval --steps 5 --peak-tflops "$PEAK" --scan auto --sync-check || status=1
echo "== 2d. One 1M-token document, evaluated window by window with the carried state (celp18, bf16), without and with the order-3 document cache"
timeout 60 $PYTHON - <<'PY' || status=1
import time

import torch

from bakallm import BakaLM, ModelConfig

device = torch.device("cuda")
length, call = 1_048_576, 8192
for cache in ({}, {"document_cache": True, "document_cache_order": 3}):
    torch.manual_seed(0)
    model = BakaLM(ModelConfig.preset("celp18", **cache)).to(device).eval()
    # Random tokens: the cache's n-gram tables grow by one entry per token, their largest size.
    document = torch.randint(0, model.config.vocab_size, (1, length + 1), device=device)
    state = model.init_state(1)
    loss_sum = torch.zeros((), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for start in range(0, length, call):
            output = model(document[:, start : start + call], state=state, targets=document[:, start + 1 : start + call + 1], return_logits=False)
            state = output.state
            loss_sum += output.loss * output.n_targets
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    loss = (loss_sum / length).item()
    name = "with the order-3 document cache" if cache else "without a document cache"
    print(f"1M-token document, {name}: {length / seconds:,.0f} tokens/s ({seconds:.1f} s), peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
          f"mean loss {loss:.3f} (untrained: about ln(vocab) = {torch.log(torch.tensor(float(model.config.vocab_size))).item():.3f})")
    if not loss == loss:
        raise SystemExit("1M-token document: the loss is NaN")
    del model, state, output
PY
exit $status
