"""Peer servers for the benchmark: the same model behind LitServe, and behind plain
FastAPI + uvicorn (what a user would write instead of a serving framework).

Both accept exactly the requests maas-serve's routes accept for the benchmark, so one set of
load-generator bodies drives every system: ``POST /v1/classifications/image`` (multipart,
fields ``model`` and ``file``) and ``POST /v1/embeddings`` (JSON ``{"model", "input"}``).
Both answer ``GET /health`` once the model is loaded.
"""
