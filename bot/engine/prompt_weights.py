"""A prompt's weights, dequantized one layer ahead into two reused buffers.

Prompts of ``products.PROMPT_MIN_TOKENS`` tokens or more are multiplied
through dequantize + cuBLAS. Per layer of Xwin-70B the dequantize reads 0.43
GB and writes 1.7 GB (memory-bound, ~0.6 ms on an H200) and the products on
1,000 tokens are compute-bound (~2.4 ms): done in line, one after the other,
the dequantize is a fifth of a long prompt's time. :class:`PromptWeights`
dequantizes layer ``i + 1`` on a side stream while layer ``i`` multiplies,
into the other of two buffers allocated once (a layer's four products each,
3.4 GB for Xwin-70B), so that nothing is allocated on the side stream: the
caching allocator keeps freed blocks per stream, and a side stream that
allocates its own matrices hoarded memory until cuBLAS ran out
(docs/gpu-notes.md item 18).

Order on the GPU, per layer ``i`` (buffer ``b = i % 2``):

- the side stream waits for ``free[b]`` (layer ``i - 2``'s products are
  done with the buffer), dequantizes layer ``i`` into it, records ``ready[b]``;
- the main stream waits for ``ready[b]``, multiplies, records ``free[b]``.

On a CPU there are no streams: each layer is dequantized in line into the
same buffers (the tests run the buffer logic there; the GPU benchmark checks
the overlap's logits against transformers' forward).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch

from bot.engine import rowquant
from bot.engine.products import LAYOUT, LayerProducts

NAMES = tuple(name for name, _, _ in LAYOUT)


class PromptWeights:
    """Two buffers of one layer's dequantized products, filled one layer ahead."""

    def __init__(
        self, products: Sequence[LayerProducts], dtype: torch.dtype, max_blocks: int = 0, priority: int = 0
    ) -> None:
        """``dtype``: the model's (the GPU kernels write half; on a CPU the
        half weights are cast, as ``rowquant.linear`` does)."""
        if not products:
            raise ValueError("no layers")
        self.products = list(products)
        first = self.products[0]
        self.shapes = {name: (getattr(first, name).row.out_features, getattr(first, name).row.in_features)
                       for name in NAMES}
        for layer in self.products:
            for name in NAMES:
                row = getattr(layer, name).row
                if (row.out_features, row.in_features) != self.shapes[name]:
                    raise ValueError(f"layers differ in the shape of {name}")
        device = first.qkv.row.w.device
        self.buffers = [
            {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in self.shapes.items()}
            for _ in range(2)
        ]
        self.max_blocks = max_blocks  # the dequantize's grid (0: one thread a word)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device=device, priority=priority)  # type: ignore[no-untyped-call]
            self.ready = [torch.cuda.Event() for _ in range(2)]  # type: ignore[no-untyped-call]
            self.free = [torch.cuda.Event() for _ in range(2)]  # type: ignore[no-untyped-call]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for buf in self.buffers for t in buf.values())

    def _fill(self, li: int) -> None:
        buf = self.buffers[li % 2]
        layer = self.products[li]
        if not self.cuda:
            for name in NAMES:
                rowquant.dequantize(getattr(layer, name).row, out=buf[name])
            return
        with torch.cuda.stream(self.side):
            if li >= 2:
                self.side.wait_event(self.free[li % 2])
            for name in NAMES:
                rowquant.dequantize(getattr(layer, name).row, out=buf[name], max_blocks=self.max_blocks)
            self.ready[li % 2].record(self.side)

    def layers(self) -> Generator[dict[str, torch.Tensor], None, None]:
        """Each layer's ``{product name: half [out, in]}`` in turn, on the
        current stream; a layer's matrices stay valid until the next layer's
        are asked for (the products must be issued before then)."""
        main = torch.cuda.current_stream(self.side.device) if self.cuda else None
        if main is not None:
            # the previous prompt's last layers may still be reading the buffers
            self.side.wait_stream(main)
        self._fill(0)
        for li in range(len(self.products)):
            if li + 1 < len(self.products):
                self._fill(li + 1)
            b = li % 2
            if main is not None:
                main.wait_event(self.ready[b])
            yield self.buffers[b]
            if main is not None:
                self.free[b].record(main)
