#!/usr/bin/env python3
"""Writes tests/fixtures/torch_small.safetensors: the numbers tests/torch_fixture.rs holds capsnet's
CPU reference (and through it every backend) to, computed by PyTorch in float64, as llm.c's
test_gpt2 holds its C code to PyTorch's.

The model is the notebook's CapsNet at a small size: 20x20 images, conv1 4 channels 9x9 ReLU, primary
capsules from a 9x9 stride-2 conv of 2 maps of 8 dims (a 2x2 grid: 8 capsules, squashed with the safe
norm), 10 digit capsules of 16 dims through W [8, 10, 16, 8] and 3 rounds of routing by agreement
(gradients through every round), capsule lengths with the safe norm, the margin loss (0.9, 0.1, 0.5,
summed over classes, mean over the batch) plus 0.0005 x the per-image sum of squared errors of a
decoder 160-16-16-400 (ReLU, ReLU, sigmoid) masked by the label. Parameters are in capsnet's layouts
(conv HWIO, dense [in, out], W [I, J, D, E]), so PyTorch's gradients are in them too. Then two Adam
steps (lr 0.01, betas 0.9/0.999, eps 1e-8) on the same batch.

The fixture holds: the images (three MNIST training digits, their centre 20x20, /255) and labels; the
parameters; the first step's lengths, loss terms and every parameter's gradient; the second step's
loss; the parameters after both steps. Every tensor is float64; the parameters are float32 values, so
capsnet's f32 backends hold them exactly.

    python3 benches/torch_fixture.py --mnist-dir data/mnist [--out tests/fixtures/torch_small.safetensors]
"""
import argparse
import gzip
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

SIDE, C1, MAPS, E, J, D, HIDDEN, ROUNDS, K = 20, 4, 2, 8, 10, 16, (16, 16), 3, 9
EPS, M_PLUS, M_MINUS, LAMBDA, RECON = 1e-7, 0.9, 0.1, 0.5, 0.0005
LR, BATCH = 0.01, 3
GRID = ((SIDE - K + 1) - K) // 2 + 1  # the primary conv's output side
CAPS = GRID * GRID * MAPS


def idx(path):
    raw = gzip.open(path, "rb").read() if path.endswith(".gz") else open(path, "rb").read()
    n = raw[3]
    dims = struct.unpack(">" + "I" * n, raw[4:4 + 4 * n])
    return dims, raw[4 + 4 * n:]


def find(d, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise SystemExit(f"{d}: no {stem}[.gz]")


def params(gen):
    """capsnet's parameters, in its order and layouts, as float32 values held in float64."""
    def glorot(shape, fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * limit

    def bias(n):  # not capsnet's zeros: a bias must show in the gradients
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 0.1

    pc, caps_out = MAPS * E, J * D
    p = {
        "conv1.weight": glorot((K, K, 1, C1), K * K, K * K * C1),
        "conv1.bias": bias(C1),
        "primary.weight": glorot((K, K, C1, pc), K * K * C1, K * K * pc),
        "primary.bias": bias(pc),
        "digit.W": torch.randn((CAPS, J, D, E), generator=gen, dtype=torch.float64) * 0.05,
        "decoder.fc1.weight": glorot((caps_out, HIDDEN[0]), caps_out, HIDDEN[0]),
        "decoder.fc1.bias": bias(HIDDEN[0]),
        "decoder.fc2.weight": glorot(HIDDEN, *HIDDEN),
        "decoder.fc2.bias": bias(HIDDEN[1]),
        "decoder.fc3.weight": glorot((HIDDEN[1], SIDE * SIDE), HIDDEN[1], SIDE * SIDE),
        "decoder.fc3.bias": bias(SIDE * SIDE),
    }
    return {k: v.float().double().requires_grad_() for k, v in p.items()}


def squash(s):
    sq = (s * s).sum(-1, keepdim=True)
    return sq / (1 + sq) * s / torch.sqrt(sq + EPS)


def forward(p, x, labels):
    """(lengths, margin, recon term, total) of one batch x [B, side, side]."""
    b = x.shape[0]
    h = F.relu(F.conv2d(x[:, None], p["conv1.weight"].permute(3, 2, 0, 1), p["conv1.bias"]))
    y = F.relu(F.conv2d(h, p["primary.weight"].permute(3, 2, 0, 1), p["primary.bias"], stride=2))
    # NHWC, then 8 consecutive channels a capsule: capsule i = (y * grid + x) * maps + m
    u = squash(y.permute(0, 2, 3, 1).reshape(b, CAPS, E))
    uhat = torch.einsum("bie,ijde->bijd", u, p["digit.W"])
    logits = torch.zeros(b, CAPS, J, dtype=torch.float64)
    for r in range(ROUNDS):
        c = torch.softmax(logits, dim=2)
        v = squash(torch.einsum("bij,bijd->bjd", c, uhat))
        if r + 1 < ROUNDS:
            logits = logits + torch.einsum("bijd,bjd->bij", uhat, v)
    lengths = torch.sqrt((v * v).sum(-1) + EPS)
    t = F.one_hot(labels, J).double()
    margin = (t * F.relu(M_PLUS - lengths) ** 2 + LAMBDA * (1 - t) * F.relu(lengths - M_MINUS) ** 2).sum(1).mean()
    d = (v * t[:, :, None]).reshape(b, J * D)
    d = F.relu(d @ p["decoder.fc1.weight"] + p["decoder.fc1.bias"])
    d = F.relu(d @ p["decoder.fc2.weight"] + p["decoder.fc2.bias"])
    recon = torch.sigmoid(d @ p["decoder.fc3.weight"] + p["decoder.fc3.bias"])
    recon_term = RECON * ((x.reshape(b, -1) - recon) ** 2).sum(1).mean()
    return lengths, margin, recon_term, margin + recon_term


def write_safetensors(path, tensors, metadata):
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    for name, t in tensors.items():
        t = t.detach().double().contiguous()
        blob = struct.pack("<%dd" % t.numel(), *t.flatten().tolist())
        header[name] = {"dtype": "F64", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist-dir", default=os.environ.get("CAPSNET_DATA", "data/mnist"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                  "torch_small.safetensors"))
    a = ap.parse_args()
    (n, rows, cols), pixels = idx(find(a.mnist_dir, "train-images-idx3-ubyte"))
    _, label_bytes = idx(find(a.mnist_dir, "train-labels-idx1-ubyte"))
    lo = (rows - SIDE) // 2
    images = torch.tensor([[[pixels[i * rows * cols + (lo + r) * cols + lo + c] / 255.0 for c in range(SIDE)]
                            for r in range(SIDE)] for i in range(BATCH)], dtype=torch.float64)
    labels = torch.tensor(list(label_bytes[:BATCH]), dtype=torch.long)

    p = params(torch.Generator().manual_seed(2017))
    start = {k: v.detach().clone() for k, v in p.items()}
    opt = torch.optim.Adam(list(p.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    lengths, margin, recon, total = forward(p, images, labels)
    opt.zero_grad()
    total.backward()
    grads = {k: v.grad.detach().clone() for k, v in p.items()}
    opt.step()
    _, _, _, total2 = forward(p, images, labels)
    opt.zero_grad()
    total2.backward()
    opt.step()

    tensors = {"images": images, "lengths": lengths}
    tensors.update({"param." + k: v for k, v in start.items()})
    tensors.update({"grad." + k: v for k, v in grads.items()})
    tensors.update({"after2." + k: v for k, v in p.items()})
    meta = {
        "config": json.dumps({"image_side": SIDE, "conv1_channels": C1, "primary_maps": MAPS,
                              "decoder_hidden": list(HIDDEN), "routing_rounds": ROUNDS}),
        "labels": json.dumps(labels.tolist()),
        "margin": repr(margin.item()), "recon": repr(recon.item()), "loss": repr(total.item()),
        "loss_step2": repr(total2.item()), "lr": repr(LR),
        "written_by": f"benches/torch_fixture.py, torch {torch.__version__}",
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_safetensors(a.out, tensors, meta)
    print(f"{a.out}: {len(tensors)} tensors; loss {total.item():.12f}, after one Adam step {total2.item():.12f}")


if __name__ == "__main__":
    main()
