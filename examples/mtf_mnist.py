"""MNIST using Mesh TensorFlow's API over torchmesh: Mesh TF's examples/mnist.py, ported line by line.

    python examples/mtf_mnist.py                                  # sim, mesh b1:2;b2:2: the image in 2 x 2 parts
    python examples/mtf_mnist.py --mesh "b1:1"                    # the single-device reference (same losses)
    torchrun --standalone --nproc-per-node 4 examples/mtf_mnist.py --backend dist
    python examples/mtf_mnist.py --data ~/mnist                   # real MNIST, if its files are there

This is an illustration, not a good model (as the original says). Each 28 x 28 image is cut
into 4 x 4 blocks of 7 x 7 pixels; the layout `row_blocks:b1;col_blocks:b2` spreads the
blocks over the 2 x 2 mesh (spatial partitioning), and each of the two 9 x 9 convolutions
(`mtf.layers.conv2d_with_blocks`) first receives 4 rows and columns from the neighbouring
blocks (a halo exchange by neighbour shifts). Dense layers and a softmax cross-entropy
follow; Mesh TF's Adafactor trains it.

`mnist_model` is the original's, line for line, with `import torchmesh.mtf as mtf`. Only the
preamble differs: no graph, lowering or Estimator: the mesh is `mtf.make_mesh(mesh_shape,
layout)`, data enters through `mtf.import_tf_tensor`, the loss leaves through `.full()`, and
`model_fn`'s training branch is an eager step (`mtf.gradients`, then the optimizer's
`apply_grads`, which updates the variables in place). Nothing is downloaded: by default the
images are a synthetic MNIST-shaped set (ten fixed blurred stroke patterns, randomly shifted
and noised, labelled by pattern), the same for a seed and step on every mesh and backend;
`--data DIR` reads MNIST's own files (train-images-idx3-ubyte and train-labels-idx1-ubyte,
optionally .gz) from DIR. Each step prints `step <n> loss <value>` on stdout.

`--backend xla` runs only with nothing split (`--layout ""`): the blocked image [batch,
row_blocks, col_blocks, rows, cols, channels] has 6 dims, and torch-xla 2.9 shards no tensor
of more than 5 ("tile_assignment ranks > 5").
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import torchmesh as tm
import torchmesh.mtf as mtf

# tf.flags: the original's flags and defaults (set from the command line by main)
FLAGS = argparse.Namespace(
    data_dir="",
    batch_size=200,
    hidden_size=512,
    train_steps=100,
    eval_steps=0,
    mesh_shape="b1:2;b2:2",
    layout="row_blocks:b1;col_blocks:b2",
    backend="sim",
    seed=0,
)


def mnist_model(image, labels, mesh):
    """The model.

    Args:
      image: tf.Tensor with shape [batch, 28*28]
      labels: a tf.Tensor with shape [batch] and dtype tf.int32
      mesh: a mtf.Mesh

    Returns:
      logits: a mtf.Tensor with shape [batch, 10]
      loss: a mtf.Tensor with shape []
    """
    batch_dim = mtf.Dimension("batch", FLAGS.batch_size)
    row_blocks_dim = mtf.Dimension("row_blocks", 4)
    col_blocks_dim = mtf.Dimension("col_blocks", 4)
    rows_dim = mtf.Dimension("rows_size", 7)
    cols_dim = mtf.Dimension("cols_size", 7)

    classes_dim = mtf.Dimension("classes", 10)
    one_channel_dim = mtf.Dimension("one_channel", 1)

    x = mtf.import_tf_tensor(
        mesh,
        image.reshape([FLAGS.batch_size, 4, 7, 4, 7, 1]),
        mtf.Shape([batch_dim, row_blocks_dim, rows_dim, col_blocks_dim, cols_dim, one_channel_dim]),
    )
    x = mtf.transpose(x, [batch_dim, row_blocks_dim, col_blocks_dim, rows_dim, cols_dim, one_channel_dim])

    # add some convolutional layers to demonstrate that convolution works.
    filters1_dim = mtf.Dimension("filters1", 16)
    filters2_dim = mtf.Dimension("filters2", 16)
    f1 = mtf.relu(
        mtf.layers.conv2d_with_blocks(
            x,
            filters1_dim,
            filter_size=[9, 9],
            strides=[1, 1],
            padding="SAME",
            h_blocks_dim=row_blocks_dim,
            w_blocks_dim=col_blocks_dim,
            name="conv0",
        )
    )
    f2 = mtf.relu(
        mtf.layers.conv2d_with_blocks(
            f1,
            filters2_dim,
            filter_size=[9, 9],
            strides=[1, 1],
            padding="SAME",
            h_blocks_dim=row_blocks_dim,
            w_blocks_dim=col_blocks_dim,
            name="conv1",
        )
    )
    x = mtf.reduce_mean(f2, reduced_dim=filters2_dim)

    # add some fully-connected dense layers.
    hidden_dim1 = mtf.Dimension("hidden1", FLAGS.hidden_size)
    hidden_dim2 = mtf.Dimension("hidden2", FLAGS.hidden_size)

    h1 = mtf.layers.dense(
        x,
        hidden_dim1,
        reduced_dims=x.shape[-4:],  # Mesh TF: x.shape.dims[-4:] (a MeshTensor's shape is the tuple of dims)
        activation=mtf.relu,
        name="hidden1",
    )
    h2 = mtf.layers.dense(h1, hidden_dim2, activation=mtf.relu, name="hidden2")
    logits = mtf.layers.dense(h2, classes_dim, name="logits")
    if labels is None:
        loss = None
    else:
        labels = mtf.import_tf_tensor(mesh, labels.reshape([FLAGS.batch_size]), mtf.Shape([batch_dim]))
        loss = mtf.layers.softmax_cross_entropy_with_logits(logits, mtf.one_hot(labels, classes_dim), classes_dim)
        loss = mtf.reduce_mean(loss)
    return logits, loss


def model_fn(features, labels, mesh, optimizer):
    """The original's model_fn in TRAIN mode, eager: the model, `mtf.gradients` of the loss
    with respect to every trainable variable, the optimizer's update (applied now), and the
    loss and logits exported as torch tensors (Mesh TF's `lowering.export_to_tf_tensor`)."""
    logits, loss = mnist_model(features, labels, mesh)
    trainable_variables = mtf.trainable_variables(mesh)  # graph.trainable_variables
    var_grads = mtf.gradients([loss], [v.outputs[0] for v in trainable_variables])
    optimizer.apply_grads(var_grads, trainable_variables)
    tf_logits = logits.full()
    tf_loss = loss.full()
    return tf_loss, tf_logits


# ---- data (the original's mnist_dataset.py, without the download) ---------------------------


def synthetic_batch(step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of MNIST-shaped images [batch, 784] in [0, 1] and labels [batch] (int32): each
    image is one of ten fixed patterns (blurred random strokes, the "digits"), shifted by up to
    3 pixels and noised; the label is the pattern's index. Depends only on seed and step."""
    g = torch.Generator().manual_seed(1234)
    strokes = (torch.rand(10, 1, 7, 7, generator=g) > 0.6).float()
    patterns = F.interpolate(strokes, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(0, 10, (batch_size,), generator=g, dtype=torch.int32)
    shifts = torch.randint(-3, 4, (batch_size, 2), generator=g)
    images = torch.stack([patterns[lab].roll(tuple(s.tolist()), (0, 1)) for lab, s in zip(labels, shifts)])
    images = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(0.0, 1.0)
    return images.reshape(batch_size, 784), labels


class DataError(Exception):
    """--data names no MNIST files."""


def read_mnist(directory: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training images [n, 784] (scaled to [0, 1]) and labels [n] from its idx files."""

    def read(name: str, magic: int, header: int) -> torch.Tensor:
        for path in (Path(directory).expanduser() / name, Path(directory).expanduser() / (name + ".gz")):
            if path.exists():
                data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                if int.from_bytes(data[:4], "big") != magic:
                    raise DataError(f"--data: {path} is not an MNIST file (magic number {magic} expected).")
                return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
        raise DataError(f"--data {directory}: no {name} (or {name}.gz) there; nothing is downloaded.")

    images = read("train-images-idx3-ubyte", 2051, 16).reshape(-1, 784).float() / 255.0
    labels = read("train-labels-idx1-ubyte", 2049, 8).to(torch.int32)
    return images, labels


def batches(steps: int):
    """(step, images, labels) for each training step, from --data or the synthetic set."""
    if FLAGS.data_dir:
        images, labels = read_mnist(FLAGS.data_dir)
        g = torch.Generator().manual_seed(FLAGS.seed)
        order = torch.randperm(len(images), generator=g)
        for step in range(steps):
            start = (step * FLAGS.batch_size) % (len(images) - FLAGS.batch_size + 1)
            idx = order[start : start + FLAGS.batch_size]
            yield step, images[idx], labels[idx]
    else:
        for step in range(steps):
            yield step, *synthetic_batch(step, FLAGS.batch_size, FLAGS.seed)


def run_mnist() -> list[float]:
    """Train for FLAGS.train_steps steps; returns the losses."""
    tm.manual_seed(FLAGS.seed)  # the variables' initial values: the same on every mesh
    mesh = mtf.make_mesh(mtf.convert_to_shape(FLAGS.mesh_shape), FLAGS.layout, backend=FLAGS.backend)
    if FLAGS.backend == "xla" and mesh.rules.rules:
        raise tm.ArgumentError(
            f"--backend xla with --layout {str(mesh.rules)!r}: the blocked image has 6 dims and torch-xla "
            f"shards no tensor of more than 5. Fix: --backend sim or dist, or --layout '' on xla."
        )
    optimizer = mtf.optimize.AdafactorOptimizer()
    show = mesh.impl.prints
    if show:
        print(f"# mesh {FLAGS.mesh_shape} ({FLAGS.backend}), layout {str(mesh.rules)!r}", file=sys.stderr, flush=True)
    losses = []
    for step, images, labels in batches(FLAGS.train_steps):
        tf_loss, _ = model_fn(images, labels, mesh, optimizer)
        losses.append(float(tf_loss.detach()))
        if show:
            print(f"step {step} loss {losses[-1]:.6f}", flush=True)
    if FLAGS.eval_steps:
        correct = 0
        for step in range(FLAGS.eval_steps):
            images, labels = synthetic_batch(10**6 + step, FLAGS.batch_size, FLAGS.seed)
            logits, _ = mnist_model(images, None, mesh)
            correct += int((logits.full().argmax(-1).cpu() == labels).sum())
        if show:
            print(f"# accuracy {correct / (FLAGS.eval_steps * FLAGS.batch_size):.3f}", file=sys.stderr, flush=True)
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # type: ignore[method-assign]
    parser.add_argument("--backend", default="sim", choices=["sim", "dist", "xla"])
    parser.add_argument("--mesh", "--mesh-shape", dest="mesh_shape", default=FLAGS.mesh_shape, help="mesh shape")
    parser.add_argument("--layout", default=FLAGS.layout, help="layout rules (rules naming absent axes are dropped)")
    parser.add_argument("--steps", type=int, default=FLAGS.train_steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=FLAGS.batch_size, help="global batch size")
    parser.add_argument("--hidden-size", type=int, default=FLAGS.hidden_size, help="size of each hidden layer")
    parser.add_argument("--eval-steps", type=int, default=0, help="synthetic evaluation batches after training")
    parser.add_argument("--data", "--data-dir", dest="data_dir", default="", help="directory of MNIST's idx files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "hidden_size"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: {getattr(args, name)} is below 1")
    FLAGS.__dict__.update(vars(args), train_steps=args.steps)
    try:
        return run_mnist()
    except (tm.TorchMeshError, DataError) as e:
        parser.exit(2, f"error: {e}\n")
        raise  # unreachable


if __name__ == "__main__":
    main()
