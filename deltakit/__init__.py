"""deltakit: what did fine-tuning change, and can it be a LoRA?

Example::

    import deltakit
    report = deltakit.rank("base-model", "fine-tuned-model", energy=0.9)   # or energy=(0.5, 0.9)
    print(report)                        # the table `deltakit rank` prints; in a notebook, `report` shows it as HTML
    print(report.matrices[0].name, report.matrices[0].rank_at[0.9])
    deltakit.extract_lora("base-model", "fine-tuned-model", "adapter", rank=16)
    deltakit.merge("base-model", "adapter", "merged")
"""

from deltakit.adapters import open_adapter
from deltakit.analyses.compare import compare
from deltakit.analyses.intruders import intruders
from deltakit.analyses.rank import rank
from deltakit.analyses.rank_report import RankReport
from deltakit.analyses.trajectory import trajectory
from deltakit.errors import DeltakitError, DeltakitWarning
from deltakit.io import open_checkpoint
from deltakit.lora import extract_lora, merge, unmerge
from deltakit.lora.intruder_scaling import scale_intruders
from deltakit.page import report_page  # importing it makes reports show as tables in notebooks, text in print()
from deltakit.spectral.options import SpectralOptions
from deltakit.version import __version__


__all__ = [
    "rank", "RankReport", "SpectralOptions", "extract_lora", "merge", "unmerge", "intruders", "scale_intruders",
    "compare", "trajectory", "report_page", "DeltakitError", "DeltakitWarning", "open_checkpoint", "open_adapter", "__version__",
]
