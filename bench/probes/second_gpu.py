"""Library calls on cuda:1 while cuda:0 is the calling thread's current device (a 2-GPU host).

Prints, step by step, whether each call gives the CPU's numbers and what the thread's current
device and stream are afterwards: `rank` on cuda:1 followed by storage_noise on cuda:1 gave 0.0
and then illegal memory accesses in tests/test_devices.py.
    python -m bench.probes.second_gpu [--steps noise:cuda:1,rank:cuda:1,...]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import deltakit
from deltakit import SpectralOptions
from deltakit.demo import write_demo_pair
from deltakit.spectral.noise import storage_noise


def state(label: str) -> None:
    index = torch.cuda.current_device()
    print(f"  after {label}: current device cuda:{index}, current stream {torch.cuda.current_stream()}, "
          f"cuda:1's current stream {torch.cuda.current_stream(1)}", flush=True)


def noise(device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(700, 300, generator=generator, dtype=torch.float64) * 0.02
    delta = torch.randn(700, 300, generator=generator, dtype=torch.float64) * 1e-4
    base, ft = w.to(torch.bfloat16).float(), (w + delta).to(torch.bfloat16).float()
    want = storage_noise(base, ft - base, torch.bfloat16, torch.bfloat16).energy
    got = storage_noise(base.to(device), (ft - base).to(device), torch.bfloat16, torch.bfloat16).energy
    print(f"noise on {device}: {got:.6g} against the CPU's {want:.6g}: {'ok' if abs(got - want) <= 1e-5 * want else 'WRONG'}",
          flush=True)


def rank(device: str, folder: str) -> None:
    base, ft = f"{folder}/base", f"{folder}/ft"
    want = deltakit.rank(base, ft, energy=(0.9,), options=SpectralOptions(device="cpu"))
    got = deltakit.rank(base, ft, energy=(0.9,), options=SpectralOptions(device=device))
    same = [g.rank_at == w.rank_at for g, w in zip(got.matrices, want.matrices)]
    print(f"rank on {device}: rank_at equal on {sum(same)} of {len(same)}", flush=True)


STEP_KINDS = ("noise", "rank")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="noise:cuda:1,rank:cuda:1,noise:cuda:1,noise:cuda:0",
                        help="comma-separated KIND:DEVICE, KIND one of noise, rank")
    args = parser.parse_args(argv)
    steps = [step.split(":", 1) for step in args.steps.split(",")]
    if any(len(step) != 2 or step[0] not in STEP_KINDS for step in steps):
        parser.error(f"--steps {args.steps!r}: each step is KIND:DEVICE with KIND one of {', '.join(STEP_KINDS)}")
    if torch.cuda.device_count() < 2:
        parser.error("this probe needs two GPUs (cuda:1 beside a current cuda:0)")
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory(prefix="dk-second-gpu-") as folder:
        write_demo_pair(folder)
        state("start")
        for kind, device in steps:
            step = f"{kind}:{device}"
            try:
                (noise if kind == "noise" else lambda d: rank(d, folder))(device)
            except Exception as exc:  # noqa: BLE001 - a probe: report and go on
                print(f"{step}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            state(step)


if __name__ == "__main__":
    main()
