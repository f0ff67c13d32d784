"""deltakit: what did fine-tuning change, and can it be a LoRA?

Example::

    import deltakit
    report = deltakit.rank("base-model", "fine-tuned-model", energy=(0.9,))
    print(report.matrices[0].name, report.matrices[0].rank_at[0.9])
"""

from deltakit.analysis import RankReport, SpectralOptions, rank
from deltakit.errors import DeltakitError
from deltakit.io import open_checkpoint
from deltakit.io.peft import open_adapter

__version__ = "0.1.0"

__all__ = ["rank", "RankReport", "SpectralOptions", "DeltakitError", "open_checkpoint", "open_adapter", "__version__"]
