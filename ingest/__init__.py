"""Ingest: image validation, blob storage, and turning an accepted image into a job."""
