"""One small module per source format; each turns the files users have into plain example dicts
(records.py schemas) whose images are loaded and checked later by sources.common."""
