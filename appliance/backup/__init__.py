"""Backups of the appliance's state: a gzip-compressed tar with its manifest first.

`archive` is the public face (write, verify, extract, and re-exports of `catalog`: list,
prune, partial files, passphrase files). Underneath, one job each: `manifest` (the format
and `BackupError`), `authenticity` (whose archive it is: the manifest's tag and key id),
`members` (tar), `compress` (gzip), `sealed` (passphrase sealing), `reader` (checking an
archive against its manifest) and `extract` (writing members out). A restore admits an
archive by `allowlist` (which members, and where each goes), keeps what it replaced in
`previous`, and takes another box's archive only through `other_box`.
"""
