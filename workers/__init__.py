"""Process entry points for the RQ side: the event workers and the periodic scheduler."""
