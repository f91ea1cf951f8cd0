#!/usr/bin/env python3
"""Attribute perf samples of a few leaf symbols to the frame that called them.

    perf script -i perf.data -F comm,period,ip,sym | benches/e2e/leaf_callers.py

For every sample whose leaf (first) frame is one of LEAVES, the first frame
further up that names one of CALLERS decides the row. Prints each leaf's
share of all samples, split by caller, so "the copy into the aligned
buffer" and "hyper's buffer growth" can be told apart in one memmove; then
the share of the AWS SDK's per-request work (samples with an SDK frame on
the stack, outside the body read and the big leaves).
"""
import collections
import sys

LEAVES = ("__memmove", "__memcpy", "clear_page", "blake3_hash_many", "_copy_to_iter", "_mi_page_malloc_zero", "__memset")
CALLERS = (
    "rehydrate::store::s3::Assembly",
    "rehydrate::buf::RawBuf::new_zeroed",
    "rehydrate::buf::BufPool::take",
    "bytes::bytes_mut::BytesMut::reserve_inner",
    "hyper::proto::h1::io::Buffered",
    "rehydrate::verify",
    "rehydrate::store::s3::read_body",
    "tcp_recvmsg",
    "tcp_sendmsg",
    "io_uring",
    "rehydrate::write",
)


def samples(lines):
    stack = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if stack:
                yield stack
            stack = []
        elif line.startswith((" ", "\t")):
            stack.append(line.strip().split(" ", 1)[-1])
        else:
            stack = []
    if stack:
        yield stack


SDK_FRAMES = ("aws_smithy", "aws_sdk_s3", "aws_sigv4", "aws_runtime")
BODY_FRAMES = ("hyper::proto::h1::io::Buffered", "rehydrate::store::s3::Assembly")


def is_sdk_request_work(stack):
    if any(leaf in stack[0] for leaf in LEAVES):
        return False
    frames = " ".join(stack)
    return any(f in frames for f in SDK_FRAMES) and not any(f in frames for f in BODY_FRAMES)


def main():
    total = 0
    by_leaf = collections.Counter()
    by_caller = collections.Counter()
    leaves = collections.Counter()
    sdk = 0
    for stack in samples(sys.stdin):
        total += 1
        leaves[stack[0]] += 1
        sdk += is_sdk_request_work(stack)
        leaf = next((name for name in LEAVES if name in stack[0]), None)
        if leaf is None:
            continue
        by_leaf[leaf] += 1
        caller = next((c for frame in stack[1:] for c in CALLERS if c in frame), "other (or not unwound further)")
        by_caller[(leaf, caller)] += 1
    print(f"{total} samples; top leaves:")
    for name, n in leaves.most_common(8):
        print(f"  {100 * n / total:5.1f} %  {name}")
    print("the big leaves by caller:")
    for leaf, n in by_leaf.most_common():
        print(f"  {100 * n / total:5.1f} %  {leaf}")
        for (l, caller), m in by_caller.most_common():
            if l == leaf:
                print(f"      {100 * m / total:5.1f} %  from {caller}")
    print(f"  {100 * sdk / max(total, 1):5.1f} %  the SDK's per-request work (SDK frames on the stack, not the body)")


if __name__ == "__main__":
    main()
