"""Shared preprocessing deployments: one per distinct preprocessing key."""
