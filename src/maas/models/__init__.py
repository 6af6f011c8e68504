"""Model families: one module per family, all on the lifecycle in :mod:`maas.models.base`."""
