"""adaptlab: a declarative Snakemake + DuckDB pipeline for transformer-adaptation studies."""
__version__ = "0.1.0"
