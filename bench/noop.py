"""The empty RQ job of the worker floor."""


def noop() -> None:
    """Do nothing: what is left is RQ's own cost per job."""
