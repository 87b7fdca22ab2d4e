"""Serving: an OpenAI-compatible HTTP server (`lmx serve`) over the decode engine.

protocol.py (request checks, response text), batcher.py (the scheduler thread that
batches requests into engine calls), server.py (the FastAPI app and the CLI).
"""
