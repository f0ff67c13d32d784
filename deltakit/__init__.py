"""deltakit: what did fine-tuning change, and can it be a LoRA?

Example::

    import deltakit
    report = deltakit.rank("base-model", "fine-tuned-model", energy=(0.9,))
    print(report.matrices[0].name, report.matrices[0].rank_at[0.9])
    deltakit.extract_lora("base-model", "fine-tuned-model", "adapter", rank=16)
    deltakit.merge("base-model", "adapter", "merged")
"""

from deltakit.analysis import RankReport, rank
from deltakit.spectral.options import SpectralOptions
from deltakit.errors import DeltakitError
from deltakit.intruders import intruders
from deltakit.io import open_checkpoint
from deltakit.adapters import open_adapter
from deltakit.lora import extract_lora, merge, unmerge
from deltakit.lora.scale_intruders import scale_intruders

__version__ = "0.1.0"

__all__ = [
    "rank", "RankReport", "SpectralOptions", "extract_lora", "merge", "unmerge", "intruders", "scale_intruders",
    "DeltakitError", "open_checkpoint", "open_adapter", "__version__",
]
