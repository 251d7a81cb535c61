"""Backups of the appliance's state: a gzip-compressed tar with its manifest first.

`archive` is the public face (write, verify, extract, and re-exports of `catalog`: list,
prune, partial files, passphrase files). Underneath, one job each: `manifest` (the format
and `BackupError`), `members` (tar), `compress` (gzip), `sealed` (passphrase sealing),
`reader` (checking an archive against its manifest) and `extract` (writing members out).
"""
