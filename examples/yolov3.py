"""Train a small one-stage detector (YOLOv3-style) on synthetic images, imperatively.

A plain JAX program in the style of the common YOLOv3 training code: a small
flax.linen conv backbone with a grid prediction head (3 anchors per cell, each
predicting x, y, w, h, objectness and class scores). Inside the step:

* the forward pass runs under `jax.vjp`; its predictions are fetched to the
  host (`np.asarray`) and decoded into boxes in numpy;
* target assignment is done per image in Python/numpy, the way YOLOv3 does it:
  a loop over the ground-truth boxes, the best anchor by width/height IoU, the
  responsible grid cell, and the targets written into numpy arrays; predicted
  boxes that already overlap a ground truth by more than IGNORE_IOU are
  excluded from the no-object loss (the "ignore mask", computed from the
  fetched predictions);
* the loss is a function of the predictions and the numpy targets,
  differentiated with `jax.value_and_grad`; its gradient goes back through the
  network with the vjp's pullback, and optax adam applies it.

Under `jax.jit` the `np.asarray` on the predictions raises
(TracerArrayConversionError).

    python examples/yolov3.py --steps 20                 # eager JAX
    python examples/yolov3.py --steps 20 --mode jit      # jax.jit(train_step): raises
    python examples/yolov3.py --steps 20 --mode terra    # terra.function(train_step)
    python examples/yolov3.py --steps 20 --mode expert   # the hand partial-jit version
"""

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (examples/ is not a package)

BATCH = 8
IMAGE = 64
STRIDE = 8
GRID = IMAGE // STRIDE
NUM_CLASSES = 3
ANCHORS = np.array([[10.0, 12.0], [18.0, 24.0], [30.0, 26.0]], np.float32)  # (w, h) px
NUM_ANCHORS = len(ANCHORS)
IGNORE_IOU = 0.5
LAMBDA_NOOBJ = 0.5
LOG_EVERY = 5

optimizer = optax.adam(1e-3)

STEP_FUNCTIONS = ("train_step",)


def head_bias_init(key, shape, dtype=jnp.float32):
    """Objectness starts at a ~2% prior (the usual detector init), the rest at 0."""
    bias = jnp.zeros((NUM_ANCHORS, 5 + NUM_CLASSES), dtype).at[:, 4].set(-4.0)
    return bias.reshape(shape)


class YoloNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features, stride in ((16, 2), (32, 2), (64, 2), (64, 1)):
            x = nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME")(x)
            x = nn.leaky_relu(x, 0.1)
        x = nn.Conv(NUM_ANCHORS * (5 + NUM_CLASSES), (1, 1),
                    kernel_init=nn.initializers.normal(0.01), bias_init=head_bias_init)(x)
        return x.reshape(x.shape[:3] + (NUM_ANCHORS, 5 + NUM_CLASSES))


model = YoloNet()


# ------------------------------------------------------------------ data

def make_dataset(seed=0, n_batches=8):
    """Images with 1-4 coloured ellipses/rectangles (3 classes) on a noisy background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[0.9, 0.3, 0.2], [0.2, 0.9, 0.3], [0.3, 0.2, 0.9]], np.float32)
    yy, xx = np.meshgrid(np.arange(IMAGE) + 0.5, np.arange(IMAGE) + 0.5, indexing="ij")
    batches = []
    for _ in range(n_batches):
        images = rng.normal(0.0, 0.15, size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
        boxes, labels = [], []
        for i in range(BATCH):
            bx, lb = [], []
            for _ in range(int(rng.integers(1, 5))):
                w, h = rng.uniform(8, 32, size=2)
                x1, y1 = rng.uniform(0, IMAGE - w), rng.uniform(0, IMAGE - h)
                c = int(rng.integers(0, NUM_CLASSES))
                if c == 1:   # class 1 is round
                    inside = (((xx - x1 - w / 2) / (w / 2)) ** 2
                              + ((yy - y1 - h / 2) / (h / 2)) ** 2) <= 1.0
                else:
                    inside = (xx >= x1) & (xx < x1 + w) & (yy >= y1) & (yy < y1 + h)
                images[i][inside] += colours[c]
                bx.append([x1, y1, x1 + w, y1 + h])
                lb.append(c)
            boxes.append(np.array(bx, np.float32))
            labels.append(np.array(lb, np.int32))
        batches.append((images, boxes, labels))
    return batches


# ------------------------------------------------------------------ numpy side

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def decode_boxes(pred):
    """(G, G, A, 5+C) raw predictions of one image -> (G, G, A, 4) x1y1x2y2 boxes."""
    gy, gx = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    cx = (gx[..., None] + sigmoid(pred[..., 0])) * STRIDE
    cy = (gy[..., None] + sigmoid(pred[..., 1])) * STRIDE
    w = ANCHORS[:, 0] * np.exp(np.clip(pred[..., 2], -6, 6))
    h = ANCHORS[:, 1] * np.exp(np.clip(pred[..., 3], -6, 6))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_iou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def wh_iou(w, h):
    """IoU of a (w, h) box with each anchor, both centred at the origin."""
    inter = np.minimum(w, ANCHORS[:, 0]) * np.minimum(h, ANCHORS[:, 1])
    return inter / (w * h + ANCHORS[:, 0] * ANCHORS[:, 1] - inter)


def build_targets(preds, gt_boxes, gt_labels):
    """YOLOv3 target assignment on the host, one image and one gt box at a time."""
    shape = (len(gt_boxes), GRID, GRID, NUM_ANCHORS)
    obj_mask = np.zeros(shape, np.float32)
    noobj_mask = np.ones(shape, np.float32)
    txy = np.zeros(shape + (2,), np.float32)
    twh = np.zeros(shape + (2,), np.float32)
    tcls = np.zeros(shape + (NUM_CLASSES,), np.float32)
    box_scale = np.zeros(shape, np.float32)
    stats = {"ignored": 0, "iou": 0.0, "hits": 0, "gt": 0}
    for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        pred_boxes = decode_boxes(preds[b])
        best = box_iou(pred_boxes.reshape(-1, 4), boxes).max(axis=1).reshape(shape[1:])
        ignore = best > IGNORE_IOU
        noobj_mask[b][ignore] = 0.0
        stats["ignored"] += int(ignore.sum())
        for box, label in zip(boxes, labels):
            w, h = box[2] - box[0], box[3] - box[1]
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            a = int(np.argmax(wh_iou(w, h)))
            i, j = int(cx // STRIDE), int(cy // STRIDE)
            obj_mask[b, j, i, a] = 1.0
            noobj_mask[b, j, i, a] = 0.0
            txy[b, j, i, a] = [cx / STRIDE - i, cy / STRIDE - j]
            twh[b, j, i, a] = [np.log(w / ANCHORS[a, 0]), np.log(h / ANCHORS[a, 1])]
            tcls[b, j, i, a, label] = 1.0
            box_scale[b, j, i, a] = 2.0 - (w * h) / (IMAGE * IMAGE)
            # how good is the responsible prediction right now (Python-side metric)
            iou = float(box_iou(pred_boxes[j, i, a][None], box[None])[0, 0])
            stats["iou"] += iou
            stats["hits"] += int(iou > 0.5 and sigmoid(preds[b, j, i, a, 4]) > 0.5)
            stats["gt"] += 1
    targets = (obj_mask, noobj_mask, txy, twh, tcls, box_scale)
    return targets, stats


# ------------------------------------------------------------------ loss

def yolo_loss(preds, obj_mask, noobj_mask, txy, twh, tcls, box_scale):
    n = preds.shape[0]
    bce = optax.sigmoid_binary_cross_entropy
    scale = (obj_mask * box_scale)[..., None]
    loss_xy = jnp.sum(scale * bce(preds[..., 0:2], txy)) / n
    loss_wh = jnp.sum(scale * 0.5 * jnp.square(preds[..., 2:4] - twh)) / n
    obj_bce = bce(preds[..., 4], obj_mask)
    loss_obj = jnp.sum(obj_mask * obj_bce) / n
    loss_noobj = LAMBDA_NOOBJ * jnp.sum(noobj_mask * obj_bce) / n
    loss_cls = jnp.sum(obj_mask[..., None] * bce(preds[..., 5:], tcls)) / n
    total = loss_xy + loss_wh + loss_obj + loss_noobj + loss_cls
    return total, {"xy": loss_xy, "wh": loss_wh, "obj": loss_obj,
                   "noobj": loss_noobj, "cls": loss_cls}


def train_step(params, opt_state, images, gt_boxes, gt_labels):
    preds, pullback = jax.vjp(lambda p: model.apply(p, images), params)
    targets, stats = build_targets(np.asarray(preds), gt_boxes, gt_labels)
    (loss, parts), grad_preds = jax.value_and_grad(yolo_loss, has_aux=True)(preds, *targets)
    (grads,) = pullback(grad_preds)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, parts, stats


# The expert's version: the forward in one jit, the numpy target assignment as it is,
# then loss + gradient + update (forward again, under the gradient) in another jit.
def expert_loss(params, images, *targets):
    return yolo_loss(model.apply(params, images), *targets)


_expert_forward = jax.jit(model.apply)
_expert_update = _common.jit_update(expert_loss, optimizer, has_aux=True)


def expert_train_step(params, opt_state, images, gt_boxes, gt_labels):
    preds = np.asarray(_expert_forward(params, images))
    targets, stats = build_targets(preds, gt_boxes, gt_labels)
    params, opt_state, (loss, parts) = _expert_update(params, opt_state, images, *targets)
    return params, opt_state, loss, parts, stats


EXPERT_STEPS = {"train_step": expert_train_step}


def run(wrap, steps, log=print, seed=0, timings=None):
    """The training loop; returns the final parameters."""
    data = make_dataset(seed)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, IMAGE, IMAGE, 3), jnp.float32))
    opt_state = optimizer.init(params)
    step_fn = wrap(train_step)
    window = {"ignored": 0, "iou": 0.0, "hits": 0, "gt": 0}
    for step in range(1, steps + 1):
        start = time.perf_counter()
        images, gt_boxes, gt_labels = data[(step - 1) % len(data)]
        params, opt_state, loss, parts, stats = step_fn(
            params, opt_state, images, gt_boxes, gt_labels)
        for k in window:
            window[k] += stats[k]
        if step % LOG_EVERY == 0:
            log(f"step {step} loss {float(loss):.4f} "
                + " ".join(f"{k} {float(v):.4f}" for k, v in parts.items())
                + f" | mean_iou {window['iou'] / window['gt']:.4f} "
                  f"recall {window['hits'] / window['gt']:.3f} ignored {window['ignored']}")
            window = {"ignored": 0, "iou": 0.0, "hits": 0, "gt": 0}
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
