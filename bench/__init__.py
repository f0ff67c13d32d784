"""deltakit's benchmark harness: synthetic Llama-shaped checkpoint pairs, timed commands, baselines.

Run ``python bench/run_bench.py --help``; bench/README.md has the full-run recipe.
"""
