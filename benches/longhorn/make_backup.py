#!/usr/bin/env python3
"""Write a Longhorn backup into a backupstore directory, as Longhorn does.

    make_backup.py ROOT VOLUME BACKUP --size-mib N [--method lz4|gzip|none] [--seed S]

ROOT gets `backupstore/` laid out as longhorn/backupstore writes it
(config.go getVolumePath/getBackupConfigPath, deltablock.go backupBlock/
getBlockFilePath/sortBackupBlocks, util/util.go GetChecksum/CompressData,
backupstore.go Volume/Backup): 2 MiB blocks named by the first 64 hex digits
of their SHA-512, compressed with the backup's method (an LZ4 frame, gzip, or
as is), stored once however many offsets hold them; all-zero blocks (holes)
not listed.

The volume: every 8th block is a hole, every 16th (from 9) a copy of block 1,
the others half seeded random bytes and half zeros (about 2:1 for lz4).
"""
import argparse
import gzip
import hashlib
import json
import os
import random

import lz4.frame

BLOCK = 2 * 1024 * 1024


def checksum(data):
    return hashlib.sha512(data).hexdigest()[:64]


def volume_dir(volume):
    c = checksum(volume.encode())
    return os.path.join("backupstore", "volumes", c[:2], c[2:4], volume)


def compress(method, data):
    if method == "lz4":
        return lz4.frame.compress(data)
    if method in ("gzip", ""):
        return gzip.compress(data, compresslevel=6)
    return data


def block_bytes(rng, index, first):
    if index % 8 == 0 and index > 0:
        return None
    if index % 16 == 9 and first is not None:
        return first
    half = rng.randbytes(BLOCK // 2)
    return half + bytes(BLOCK // 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("volume")
    p.add_argument("backup")
    p.add_argument("--size-mib", type=int, required=True)
    p.add_argument("--method", default="lz4")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--image", help="also write the volume's bytes here")
    a = p.parse_args()
    rng = random.Random(a.seed)
    size = a.size_mib << 20
    assert size % BLOCK == 0, "the volume size must be a multiple of 2 MiB"
    vdir = os.path.join(a.root, volume_dir(a.volume))
    os.makedirs(os.path.join(vdir, "backups"), exist_ok=True)
    image = open(a.image, "wb") if a.image else None
    blocks, first, new = [], None, 0
    for index in range(size // BLOCK):
        data = block_bytes(rng, index, first)
        if index == 1:
            first = data
        if image:
            image.write(data if data is not None else bytes(BLOCK))
        if data is None:
            continue
        c = checksum(data)
        path = os.path.join(vdir, "blocks", c[:2], c[2:4], c + ".blk")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(compress(a.method, data))
            new += 1
        blocks.append({"Offset": index * BLOCK, "BlockChecksum": c})
    if image:
        image.close()
    now = "2026-12-01T10:05:00Z"
    volume = {"Name": a.volume, "Size": str(size), "Labels": {}, "CreatedTime": now, "LastBackupName": a.backup,
              "LastBackupAt": now, "BlockCount": str(new), "BackingImageName": "", "BackingImageChecksum": "",
              "CompressionMethod": a.method, "StorageClassName": "longhorn", "DataEngine": "v1"}
    backup = {"Name": a.backup, "VolumeName": a.volume, "SnapshotName": "snap", "SnapshotCreatedAt": now,
              "CreatedTime": now, "Size": str(len(blocks) * BLOCK), "Labels": {}, "IsIncremental": False,
              "CompressionMethod": a.method, "Blocks": blocks, "SingleFile": {"FilePath": ""}, "Deleting": False}
    with open(os.path.join(vdir, "volume.cfg"), "w") as f:
        json.dump(volume, f)
    with open(os.path.join(vdir, "backups", "backup_%s.cfg" % a.backup), "w") as f:
        json.dump(backup, f)
    print(json.dumps({"blocks_listed": len(blocks), "objects": new, "volume_bytes": size}))


if __name__ == "__main__":
    main()
