"""Benchmark results: the SQLite database every `bakallm bench` appends to, and the tables printed from it."""

from bakallm.results.db import ResultRow, ResultsDB, default_db_path
from bakallm.results.table import format_table

__all__ = ["ResultRow", "ResultsDB", "default_db_path", "format_table"]
