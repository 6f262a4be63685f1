"""Fakes shared by the test suite and the benchmarks (not a test suite itself).

``bench`` may not import ``tests`` (an import contract in pyproject.toml), so
what both use lives here: a fake OpenAI-compatible server, ``transformers
serve`` started on port 0, and a tiny byte-level tokenizer.
"""
