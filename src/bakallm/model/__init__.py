"""The network, one module per part. Of bakallm it imports only kernels, errors and lazy (tests/test_layout.py):

    config.py     ModelConfig: the shape, the presets and the choices of the reference system
    network.py    BakaLM: windows of [read memory | tokens with pauses | write slots] through the blocks
    attention.py  attention over the window and the previous window's keys/values (XL cache)
    rotary.py     rotary positions
    mlp.py        the gated MLP, whose gate is
    elephant.py   the Elephant function 1/(1+|x/a|^d), fused to save memory
    mamba.py      the Mamba block, its state carried from window to window (scans in bakallm.kernels)
    window.py     the window runtime (WindowReader): reads a window whole or in pieces, then commits it;
                  forward calls and incremental decoding both go through it
    state.py      RecurrentState: what a row carries to its next window, reset row by row
    document_cache.py  the optional unigram/n-gram cache of the document read so far
    files.py      weights and config on disk, without a model class
    io.py         load_model (and files.py's names)

Training, distribution and compilation are applied from outside (bakallm.training, bakallm.acceleration).
"""

from __future__ import annotations

from bakallm.lazy import lazy_exports

# Imported on first use, so that reading a ModelConfig does not pay for the network's modules.
_LAZY_EXPORTS = {
    "ModelConfig": "bakallm.model.config",
    "RecurrentState": "bakallm.model.state",
    "BakaLM": "bakallm.model.network",
    "ModelOutput": "bakallm.model.network",
    "WindowReader": "bakallm.model.window",
    "load_model": "bakallm.model.io",
}

__all__ = list(_LAZY_EXPORTS)

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
