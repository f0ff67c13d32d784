"""deltakit's benchmark suite: named targets on named synthetic pairs, each checked; ``python -m bench run --help``."""
