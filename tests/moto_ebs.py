#!/usr/bin/env python3
"""moto_server with its EBS direct APIs corrected, and a snapshot writer.

moto 5.2 (PyPI `moto[server]`) implements the EBS direct APIs, but not
faithfully enough for the Rust AWS SDK (see INTEROP.md): it reports a block
size of 512, returns `BlockIndex` as a JSON string, does not sort or page,
ignores block tokens and answers an unknown snapshot with an HTML 500. This
launcher patches `moto/ebs/models.py` and `responses.py` behaviour at import
time so the answers are the service's:

- `BlockSize` 524288 (EBS blocks are 512 KiB);
- `ListSnapshotBlocks`: `BlockIndex` an integer, blocks sorted by index,
  `startingBlockIndex`, `maxResults` (100..10000) and `pageToken`/`NextToken`
  honoured, `ExpiryTime` given;
- `GetSnapshotBlock`: the block token checked (`ValidationException`,
  `INVALID_BLOCK_TOKEN` otherwise);
- an unknown snapshot: `404` with `x-amzn-ErrorType: ResourceNotFoundException`.

Usage:
  moto_ebs.py serve PORT                 run the corrected moto_server on 127.0.0.1:PORT
  moto_ebs.py write ENDPOINT IMAGE       write IMAGE as a snapshot through the EBS
                                         APIs (boto3: StartSnapshot, PutSnapshotBlock,
                                         CompleteSnapshot); print its id
"""

import base64
import hashlib
import json
import sys
import time

BLOCK_SIZE = 512 * 1024


def not_found(snapshot_id):
    body = json.dumps({"message": f"The snapshot '{snapshot_id}' does not exist.", "Reason": "SNAPSHOT_NOT_FOUND"})
    headers = {"status": 404, "x-amzn-ErrorType": "ResourceNotFoundException", "Content-Type": "application/json"}
    return 404, headers, body


def validation(reason, message):
    body = json.dumps({"message": message, "Reason": reason})
    return 400, {"status": 400, "x-amzn-ErrorType": "ValidationException", "Content-Type": "application/json"}, body


def patch_moto():
    from moto.ebs import models, responses

    original_init = models.EBSSnapshot.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.block_size = BLOCK_SIZE

    models.EBSSnapshot.__init__ = init

    def list_snapshot_blocks(self):
        snapshot_id = self.path.split("?")[0].split("/")[-2]
        snapshot = self.ebs_backend.snapshots.get(snapshot_id)
        if snapshot is None:
            return not_found(snapshot_id)
        params = self._get_params()
        start = int(params.get("startingBlockIndex") or 0)
        token = params.get("pageToken")
        if token:
            start = int(token)
        page_max = min(max(int(params.get("maxResults") or 10000), 100), 10000)
        indexes = sorted(int(i) for i in snapshot.blocks)
        page = [i for i in indexes if i >= start][: page_max + 1]
        body = {
            "Blocks": [{"BlockIndex": i, "BlockToken": snapshot.blocks[str(i)].block_token} for i in page[:page_max]],
            "VolumeSize": snapshot.volume_size,
            "BlockSize": snapshot.block_size,
            "ExpiryTime": time.time() + 7 * 24 * 3600,
        }
        if len(page) > page_max:
            body["NextToken"] = str(page[page_max])
        return 200, {"status": 200, "Content-Type": "application/json"}, json.dumps(body)

    def get_snapshot_block(self):
        parts = self.path.split("?")[0].split("/")
        snapshot_id, block_index = parts[-3], parts[-1]
        snapshot = self.ebs_backend.snapshots.get(snapshot_id)
        if snapshot is None:
            return not_found(snapshot_id)
        block = snapshot.blocks.get(str(int(block_index)))
        if block is None:
            return validation("INVALID_BLOCK", f"block {block_index} is not in the snapshot")
        if self._get_params().get("blockToken") != block.block_token:
            return validation("INVALID_BLOCK_TOKEN", "The block token is not valid.")
        headers = {
            "status": 200,
            "x-amz-Checksum": block.checksum,
            "x-amz-Checksum-Algorithm": block.checksum_algorithm,
            "x-amz-Data-Length": str(len(block.block_data)),
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, block.block_data

    responses.EBSResponse.list_snapshot_blocks = list_snapshot_blocks
    responses.EBSResponse.get_snapshot_block = get_snapshot_block


def serve(port):
    patch_moto()
    from moto.server import main

    main(["-H", "127.0.0.1", "-p", str(port)])


def write(endpoint, image):
    import boto3

    ebs = boto3.client(
        "ebs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with open(image, "rb") as f:
        data = f.read()
    volume_gib = max(1, -(-len(data) // (1 << 30)))
    snapshot_id = ebs.start_snapshot(VolumeSize=volume_gib, Description="written by boto3")["SnapshotId"]
    written = 0
    for index in range(-(-len(data) // BLOCK_SIZE)):
        block = data[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE].ljust(BLOCK_SIZE, b"\0")
        if not any(block):
            continue  # as `coldsnap upload --omit-zero-blocks`: zero blocks are not stored
        checksum = base64.b64encode(hashlib.sha256(block).digest()).decode()
        ebs.put_snapshot_block(
            SnapshotId=snapshot_id,
            BlockIndex=index,
            BlockData=block,
            DataLength=BLOCK_SIZE,
            Checksum=checksum,
            ChecksumAlgorithm="SHA256",
        )
        written += 1
    ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=written)
    print(snapshot_id)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
