"""How long does a fresh process take before deltakit does any work? `import torch`, then CUDA start-up.

Run: python -m bench.startup_probe. Prints one JSON line per measurement, in seconds.
"""

from __future__ import annotations

import importlib
import json
import time

start = time.perf_counter()
import torch  # noqa: E402  (the import is what is timed)

print(json.dumps({"probe": "import torch", "seconds": round(time.perf_counter() - start, 2)}), flush=True)
start = time.perf_counter()
importlib.import_module("deltakit")  # timed: what deltakit adds on top of torch

print(json.dumps({"probe": "import deltakit (torch already imported)",
                  "seconds": round(time.perf_counter() - start, 2)}), flush=True)
if torch.cuda.is_available():
    start = time.perf_counter()
    torch.zeros(1, device="cuda")
    print(json.dumps({"probe": "CUDA start-up", "seconds": round(time.perf_counter() - start, 2)}), flush=True)
