#!/usr/bin/env python3
"""A restore that follows Longhorn's own procedure, for the benchmark.

    reference_restore.py ENDPOINT BUCKET PREFIX VOLUME BACKUP TARGET [--concurrency N]

What longhorn/backupstore deltablock.go `RestoreDeltaBlockBackup` does, over
plain HTTP GETs (the nginx fixture needs no signature; Longhorn's S3 driver
would add SigV4 and aws-sdk-go on top, so this is its best case):

- load volume.cfg and the backup config; truncate a regular target to the
  volume size (the pre-truncate for XFS, longhorn#2503);
- `populateBlocksForFullRestore`: one producer feeds backup.Blocks, in the
  config's (ascending offset) order, into a channel of 10;
- `restoreBlocks` x ConcurrentLimit: each worker opens the target itself and,
  per block, reads the object (`DecompressAndVerifyWithFallback`:
  decompress by the backup's method, falling back between gzip and lz4 on a
  bad header), checks its SHA-512 checksum, seeks to its offset and writes
  DEFAULT_BLOCK_SIZE bytes. No block is fetched once for several offsets:
  every listed block is read.
- ConcurrentLimit defaults to 2: longhorn-manager's setting
  `restore-concurrent-limit` (types/setting.go,
  SettingDefinitionRestoreConcurrentLimit, Default "2").

Longhorn's restore does not fsync; this one fsyncs at the end so the timed
window holds the same durability as rehydrate's (which fdatasyncs).
"""
import argparse
import gzip
import hashlib
import http.client
import json
import os
import queue
import sys
import threading
import urllib.parse

import lz4.frame

BLOCK = 2 * 1024 * 1024


def checksum(data):
    return hashlib.sha512(data).hexdigest()[:64]


def volume_dir(volume):
    c = checksum(volume.encode())
    return "backupstore/volumes/%s/%s/%s" % (c[:2], c[2:4], volume)


class Store:
    def __init__(self, endpoint, bucket, prefix):
        u = urllib.parse.urlparse(endpoint)
        self.host, self.port = u.hostname, u.port or 80
        self.base = "/%s/%s" % (bucket, prefix.strip("/")) if prefix else "/" + bucket
        self.conn = None

    def get(self, key):
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                self.conn.request("GET", "%s/%s" % (self.base, key))
                r = self.conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise IOError("GET %s: %d" % (key, r.status))
                return body
            except (http.client.HTTPException, ConnectionError):
                self.conn = None
                if attempt == 2:
                    raise


def decompress(method, raw):
    def one(m):
        if m == "lz4":
            return lz4.frame.decompress(raw)
        if m in ("gzip", ""):
            return gzip.decompress(raw)
        return raw
    try:
        return one(method)
    except Exception:
        # DecompressAndVerifyWithFallback: gzip <-> lz4 on a bad header.
        return one("gzip" if method == "lz4" else "lz4")


def worker(store, vdir, method, target, blocks, errors):
    fd = os.open(target, os.O_RDWR)
    try:
        while True:
            blk = blocks.get()
            if blk is None:
                return
            c = blk["BlockChecksum"]
            data = decompress(method, store.get("%s/blocks/%s/%s/%s.blk" % (vdir, c[:2], c[2:4], c)))
            if checksum(data) != c:
                raise IOError("checksum verification failed for block %s" % c)
            os.pwrite(fd, data[:BLOCK], int(blk["Offset"]))
    except Exception as e:  # noqa: BLE001 - reported and fails the run
        errors.append(e)
        while blocks.get() is not None:
            pass
    finally:
        os.close(fd)


def main():
    p = argparse.ArgumentParser()
    for name in ("endpoint", "bucket", "prefix", "volume", "backup", "target"):
        p.add_argument(name)
    p.add_argument("--concurrency", type=int, default=2)
    a = p.parse_args()
    meta = Store(a.endpoint, a.bucket, a.prefix)
    vdir = volume_dir(a.volume)
    vol = json.loads(meta.get(vdir + "/volume.cfg"))
    backup = json.loads(meta.get("%s/backups/backup_%s.cfg" % (vdir, a.backup)))
    if not backup.get("CreatedTime"):
        sys.exit("backup in progress")
    size = int(vol["Size"])
    fd = os.open(a.target, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    blocks, errors = queue.Queue(maxsize=10), []
    method = backup.get("CompressionMethod", "")
    threads = [threading.Thread(target=worker, args=(Store(a.endpoint, a.bucket, a.prefix), vdir, method, a.target, blocks, errors))
               for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for blk in backup["Blocks"]:
        blocks.put(blk)
    for _ in threads:
        blocks.put(None)
    for t in threads:
        t.join()
    os.fsync(fd)
    os.close(fd)
    if errors:
        sys.exit("restore failed: %s" % errors[0])


if __name__ == "__main__":
    main()
