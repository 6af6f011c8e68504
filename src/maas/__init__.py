"""maas-serve: Model-as-a-Service on Ray Serve.

Public surface: :func:`maas.app.build_app` (the serve config's ``import_path`` target),
:class:`maas.config.AppConfig` / :class:`maas.config.ModelSpec`, and the error types in
:mod:`maas.errors`. Everything else is internal.
"""

__version__ = "0.1.0"
