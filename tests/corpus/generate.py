#!/usr/bin/env python3
"""Writes the static files of the bad-input corpus (run from tests/corpus). Checkpoint variants are
made by tests/corpus.rs from a fresh checkpoint, so they follow the current format."""
import gzip, os, struct

def w(name, data):
    open(name, "wb").write(data if isinstance(data, bytes) else data.encode())

w("empty.csv", "")
w("header-only.csv", "label,a,b\n")
w("ragged.csv", "0,1,2\n1,3\n0,1,1\n")
w("nan.csv", "0,1,2\n1,NaN,4\n0,1,1\n")
w("inf.csv", "0,1,2\n1,2,inf\n0,1,1\n")
w("huge.csv", "0,1,2\n1,1e39,4\n0,1,1\n")
w("overflow.csv", "0,1,2\n1,1e999,4\n0,1,1\n")
w("text-cell.csv", "0,1,2\n1,abc,4\n0,1,1\n")
w("missing-cell.csv", "0,1,2\n1,,4\n0,1,1\n")
w("non-utf8.csv", b"0,1,2\n1,\xff\xfe,4\n0,1,1\n")
w("bom-nan.csv", b"\xef\xbb\xbf0,1,2\n1,2,3\n0,nan,1\n")
w("label-fraction.csv", "0,1,2\n1.5,2,3\n0,1,1\n1,2,2\n")
w("label-negative.csv", "0,1,2\n-1,2,3\n0,1,1\n1,2,2\n")
w("single-class.csv", "0,1,2\n0,2,3\n0,1,1\n0,2,2\n")
w("one-column.csv", "0\n1\n0\n1\n")
w("three-classes.csv", "0,1,2\n1,2,3\n2,1,1\n0,2,2\n1,3,3\n")
w("test-label-7.csv", "0,1,2\n7,2,3\n")
w("header-named.csv", "y,a,b\n0,1,2\n1,2,3\n0,1,1\n1,3,3\n")

def images(n, r=2, c=2, magic=0x803, extra=b"", cut=0):
    b = struct.pack(">IIII", magic, n, r, c) + bytes((i * 37) % 256 for i in range(n * r * c)) + extra
    return b[: len(b) - cut] if cut else b

def labels(n, magic=0x801):
    return struct.pack(">II", magic, n) + bytes(i % 2 for i in range(n))

def mnist(name, tr_img, tr_lab, gz=True):
    os.makedirs(name, exist_ok=True)
    for f, data in [("train-images-idx3-ubyte", tr_img), ("train-labels-idx1-ubyte", tr_lab),
                    ("t10k-images-idx3-ubyte", images(4)), ("t10k-labels-idx1-ubyte", labels(4))]:
        if gz:
            w(os.path.join(name, f + ".gz"), gzip.compress(data, mtime=0))
        else:
            w(os.path.join(name, f), data)

mnist("idx-truncated", images(8, cut=5), labels(8))
mnist("idx-wrong-magic", images(8, magic=0x1234), labels(8))
mnist("idx-label-magic", images(8), labels(8, magic=0x803))
mnist("idx-count-mismatch", images(8), labels(7))
mnist("idx-trailing", images(8, extra=b"junk"), labels(8), gz=False)
mnist("idx-header-short", b"\x00\x00\x08\x03\x00\x00", labels(8), gz=False)
mnist("idx-absurd-header", struct.pack(">IIII", 0x803, 0xFFFFFFFF, 0xFFFF, 0xFFFF), labels(8), gz=False)
mnist("idx-corrupt-gzip", images(8), labels(8))
g = bytearray(gzip.compress(images(8), mtime=0))
g[-6] ^= 0xFF  # the CRC-32 in the gzip trailer
w("idx-corrupt-gzip/train-images-idx3-ubyte.gz", bytes(g))
os.makedirs("idx-missing", exist_ok=True)
w("idx-missing/README", "a directory without MNIST files\n")
w("junk.safetensors", b'\x10\x00\x00\x00\x00\x00\x00\x00{"oops": true}  ')
w("zero.safetensors", b"")

# second round: limits checked before allocating, data that changed under a checkpoint
w("stray-label.csv", "0,1,2\n1,2,3\n16777215,1,1\n0,2,2\n1,3,3\n")
# a small gzip whose header claims 4 images of 16384 × 16384 pixels (268 M features each)
mnist("idx-wide-images", struct.pack(">IIII", 0x803, 4, 16384, 16384) + bytes(1 << 16), labels(4))
# iris with every sample's first feature moved by 0.1: the same shape, other contents
rows = [r.split(",") for r in open(os.path.join("..", "data", "iris.csv")).read().split()]
w("iris-edited.csv", "".join(",".join([r[0], "%g" % (float(r[1]) + 0.1)] + r[2:]) + "\n" for r in rows))
