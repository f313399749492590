"""Long-video multiple-choice QA evaluation of any OpenAI-compatible endpoint (``qtsplus-eval``).

- :mod:`.datasets`: Video-MME, MLVU, LongVideoBench and the reference's choice JSONL, from local files.
- :mod:`.prompts`: each benchmark's prompt and a robust answer-letter extraction.
- :mod:`.modes`: selection on / off / ``qtsplus_rho_max`` sweeps, fps and frame limits per request.
- :mod:`.client`: the asynchronous runner (bounded concurrency, streaming TTFT, resumable JSONL).
- :mod:`.stats`, :mod:`.report`: bootstrap intervals, McNemar, summary JSON, Markdown and a plot.
- :mod:`.media`: video URLs (``file://`` or a local HTTP server the client starts).
- :mod:`.mini`: generated mini-benchmarks in every layout, for tests and smoke runs.

Usage: ``docs/evaluation.md``.
"""
