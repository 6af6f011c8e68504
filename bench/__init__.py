"""``make bench``: maas-serve against the in-process limit and against peer servers.

Run ``python -m bench --help`` (or ``make bench``) from the repository root. Modules:

* :mod:`bench.inputs` — the real inputs (scikit-image photos as JPEG, English sentences).
* :mod:`bench.workloads` — the same model work as plain torch code (decode → transform →
  forward for images; tokenise → forward → pool for MiniLM), used by the limit and the peers.
* :mod:`bench.limit` — the hardware limit: that work in one process, no serving.
* :mod:`bench.load` — HTTP load with ``wrk`` (a C load generator) and its Lua scripts.
* :mod:`bench.systems` — starting and stopping maas-serve, LitServe and FastAPI servers.
* :mod:`bench.memory` — resident memory of a process tree (all of Ray's workers).
* :mod:`bench.report` — JSON → markdown table and PNG plot.
"""
