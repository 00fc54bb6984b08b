"""Prefect flows around the ghosted pipeline: `compress` (the DVC stages as retried, cached tasks) and
`recompress` (compress again only when the base model's fingerprint changed; can be served on a cron)."""
