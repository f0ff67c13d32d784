"""Where `rank`'s wall time goes on a real pair: the stream alone, then each per-matrix part.

    python -m bench.probes.rank_profile BASE FT --device cuda --out OUT

1. the stream alone (read, copy to the device, ΔW), nothing computed;
2. the stream with rank's per-matrix work, each part synchronised and timed: fp64 norms, the
   storage-noise model, the spectrum (adaptive rounds and the tail's quadrature apart), the
   metrics, the amplification factor;
3. `deltakit.analysis.rank` itself, unsynchronised, as users run it.
Writes ``rank_profile.json``; the parts' sum against (3) shows what overlaps and what does not.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import torch

from bench.probes import pair_parser, write_result
import deltakit.spectral.partial as partial
import deltakit.spectral.spectrum as spectrum_module
from deltakit.analysis import ADAPTIVE_PLAN, _fro, analyse_matrix, rank
from deltakit.delta import open_delta_source, resolve_device
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.subspace import amplification


class Clock:
    """Synchronised timers by name."""

    def __init__(self, device: torch.device):
        self.device, self.totals, self.counts = device, defaultdict(float), defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.totals[name] += time.perf_counter() - start
            self.counts[name] += 1
            return out
        return timed


def main(argv: list[str] | None = None) -> int:
    parser = pair_parser(__doc__)
    parser.add_argument("--limit", type=int, default=0, help="only the first N pairs (0: all)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    options = SpectralOptions(device=str(device))
    source = open_delta_source(args.base, args.ft, (), ())
    chosen = list(range(len(source.pairs)))[: args.limit or None]
    result: dict[str, object] = {"device": str(device), "pairs": len(chosen)}

    clock = Clock(device)
    clock.sync()
    start = time.perf_counter()
    for item in source.stream(chosen, device, options.dtype, options.reads_ahead(device)):
        clock.sync()
        del item
    result["stream_only_s"] = time.perf_counter() - start

    parts = Clock(device)
    originals = (partial.SubspaceIteration.round, partial.SubspaceIteration.__init__, spectrum_module.start_tail_sums,
                 partial.PendingTail.result)
    partial.SubspaceIteration.round = parts.wrap("adaptive_rounds", originals[0])
    partial.SubspaceIteration.__init__ = parts.wrap("adaptive_warmup", originals[1])
    spectrum_module.start_tail_sums = parts.wrap("tail_lanczos_start", originals[2])
    partial.PendingTail.result = parts.wrap("tail_lanczos_wait_and_quadrature", originals[3])
    import deltakit.analysis as analysis
    saved = (analysis.storage_noise, analysis.amplification, analysis.adaptive_spectrum, analysis.compute_spectrum)
    analysis.storage_noise = parts.wrap("storage_noise", storage_noise)
    analysis.amplification = parts.wrap("amplification", amplification)
    analysis.adaptive_spectrum = parts.wrap("adaptive_spectrum", saved[2])
    analysis.compute_spectrum = parts.wrap("full_spectrum", saved[3])
    adaptive = options.adaptive_on(device)
    try:
        clock.sync()
        start = time.perf_counter()
        waited = 0.0
        stream = source.stream(chosen, device, options.dtype, options.reads_ahead(device))
        while True:
            before = time.perf_counter()
            item = next(stream, None)
            clock.sync()
            waited += time.perf_counter() - before
            if item is None:
                break
            if item.pair.is_matrix and item.pair.layout != "vector" and item.delta.ndim == 2:
                parts.wrap("analyse_matrix", analyse_matrix)(item, (0.9,), options, True, adaptive)
            else:
                parts.wrap("fro_vectors", _fro)(item.delta)
            del item
        result["instrumented_s"] = time.perf_counter() - start
        result["waiting_for_stream_s"] = waited
    finally:
        (partial.SubspaceIteration.round, partial.SubspaceIteration.__init__, spectrum_module.start_tail_sums,
         partial.PendingTail.result) = originals
        analysis.storage_noise, analysis.amplification, analysis.adaptive_spectrum, analysis.compute_spectrum = saved
    result["parts_s"] = dict(parts.totals)
    result["parts_calls"] = dict(parts.counts)

    clock.sync()
    start = time.perf_counter()
    report = rank(args.base, args.ft, (0.9,), options)
    result["rank_s"] = time.perf_counter() - start
    result["rank_elapsed_s"] = report.elapsed_s
    methods: dict[str, int] = defaultdict(int)
    for m in report.matrices:
        methods[m.spectrum_method] += 1
    result["methods"] = dict(methods)
    result["plan"] = str(ADAPTIVE_PLAN)
    print(json.dumps(result, indent=1))
    write_result(args.out, "rank_profile.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
