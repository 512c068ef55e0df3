"""Train a small two-stage detector (Faster R-CNN) on synthetic images, imperatively.

A plain JAX program in the style of the classic Faster R-CNN training code: a
small conv backbone, a region proposal network (RPN), and a second-stage ROI
head. The parts that detection code always does on the host are done in numpy
inside the step, on values fetched from the device with `np.asarray`:

* decoding the RPN's box deltas into proposals, top-k by objectness and
  non-maximum suppression (a Python `while` loop over numpy boxes);
* anchor matching (IoU of anchors with the ground truth, positive/negative
  labels, random sampling of a fixed number of anchors per image);
* proposal sampling for the second stage (ground-truth boxes added, IoU
  matching, a fixed number of foreground/background ROIs drawn at random).

Then the sampled ROIs' features are pooled with a bilinear gather (ROI-Align
with one sample per bin: the sampling plan is made in numpy, the gather and
weighting by `jax.numpy` indexing), and the four losses are
differentiated with `jax.value_and_grad` and applied with optax SGD. Under
`jax.jit` the `np.asarray` on the RPN outputs raises
(TracerArrayConversionError).

    python examples/faster_rcnn.py --steps 20                 # eager JAX
    python examples/faster_rcnn.py --steps 20 --mode jit      # jax.jit(train_step): raises
    python examples/faster_rcnn.py --steps 20 --mode terra    # terra.function(train_step)
    python examples/faster_rcnn.py --steps 20 --mode expert   # the hand partial-jit version
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (examples/ is not a package)

BATCH = 2
IMAGE = 64
NUM_CLASSES = 3                # foreground classes; class 0 of the head is background
STRIDE = 4                     # backbone output stride -> 16x16 feature map
FEAT = IMAGE // STRIDE
CHANNELS = 32
ANCHOR_SIZES = (12.0, 20.0, 32.0)
NUM_ANCHORS = len(ANCHOR_SIZES)

RPN_BATCH = 32                 # sampled anchors per image
RPN_POS_FRACTION = 0.5
RPN_POS_IOU, RPN_NEG_IOU = 0.6, 0.3
PRE_NMS, POST_NMS, NMS_IOU = 150, 40, 0.7
ROIS = 16                      # sampled ROIs per image (fixed, so shapes never change)
ROI_FG_FRACTION = 0.25
ROI_FG_IOU = 0.5
POOL = 4                       # ROI-Align output is POOL x POOL
BOX_STD = np.array([0.1, 0.1, 0.2, 0.2], np.float32)
LOG_EVERY = 5

optimizer = optax.sgd(learning_rate=0.02, momentum=0.9)

# The program's host-side sampling RNG; `run` reseeds it.
sample_rng = np.random.RandomState(0)

STEP_FUNCTIONS = ("train_step",)


# ------------------------------------------------------------------ data, anchors

def make_dataset(seed=0, n_batches=8):
    """Images with 1-3 coloured, textured rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.3, 0.9]], np.float32)
    batches = []
    for _ in range(n_batches):
        images = rng.normal(0.0, 0.15, size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
        boxes, labels = [], []
        for i in range(BATCH):
            n = int(rng.integers(1, 4))
            bx, lb = [], []
            for _ in range(n):
                w, h = rng.uniform(10, 30, size=2)
                x1, y1 = rng.uniform(0, IMAGE - w), rng.uniform(0, IMAGE - h)
                c = int(rng.integers(0, NUM_CLASSES))
                xa, ya = int(round(x1)), int(round(y1))
                xb, yb = int(round(x1 + w)), int(round(y1 + h))
                images[i, ya:yb, xa:xb] += colours[c]
                bx.append([xa, ya, xb, yb])
                lb.append(c)
            boxes.append(np.array(bx, np.float32))
            labels.append(np.array(lb, np.int32))
        batches.append((images, boxes, labels))
    return batches


def make_anchors():
    """(FEAT*FEAT*A, 4) anchors, x1y1x2y2 in image pixels, in (y, x, a) order."""
    centres = (np.arange(FEAT, dtype=np.float32) + 0.5) * STRIDE
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    sizes = np.array(ANCHOR_SIZES, np.float32)
    half = sizes[None, None, :] / 2
    anchors = np.stack([cx[..., None] - half, cy[..., None] - half,
                        cx[..., None] + half, cy[..., None] + half], axis=-1)
    return anchors.reshape(-1, 4)


ANCHORS = make_anchors()


# ------------------------------------------------------------------ numpy box ops

def box_iou(a, b):
    """IoU matrix (len(a), len(b)) of x1y1x2y2 boxes."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def encode(boxes, gt):
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([(gx - cx) / w, (gy - cy) / h, np.log(gw / w), np.log(gh / h)], axis=1)


def decode(boxes, deltas):
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dw = np.minimum(deltas[:, 2], np.log(1000.0 / 16))
    dh = np.minimum(deltas[:, 3], np.log(1000.0 / 16))
    px, py = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    pw, ph = w * np.exp(dw), h * np.exp(dh)
    out = np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], axis=1)
    return np.clip(out, 0.0, float(IMAGE))


def nms(boxes, scores, iou_threshold):
    """Greedy NMS; returns kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = box_iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.array(keep, np.int64)


def propose(objectness, deltas):
    """RPN outputs of one image (numpy) -> proposals after top-k and NMS."""
    order = np.argsort(-objectness, kind="stable")[:PRE_NMS]
    boxes = decode(ANCHORS[order], deltas[order])
    scores = objectness[order]
    big = ((boxes[:, 2] - boxes[:, 0]) >= 2.0) & ((boxes[:, 3] - boxes[:, 1]) >= 2.0)
    boxes, scores = boxes[big], scores[big]
    keep = nms(boxes, scores, NMS_IOU)[:POST_NMS]
    return boxes[keep]


def rpn_targets(gt):
    """Anchor matching for one image: labels, box targets and sample weights."""
    n = len(ANCHORS)
    iou = box_iou(ANCHORS, gt)
    best_gt = iou.argmax(axis=1)
    best_iou = iou.max(axis=1)
    labels = np.full(n, -1, np.int64)
    labels[best_iou < RPN_NEG_IOU] = 0
    labels[iou.argmax(axis=0)] = 1          # every gt box gets its best anchor
    labels[best_iou >= RPN_POS_IOU] = 1
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    n_pos = min(len(pos), int(RPN_BATCH * RPN_POS_FRACTION))
    pos = sample_rng.choice(pos, n_pos, replace=False)
    neg = sample_rng.choice(neg, RPN_BATCH - n_pos, replace=False)
    weights = np.zeros(n, np.float32)
    weights[pos] = 1.0
    weights[neg] = 1.0
    is_pos = np.zeros(n, np.float32)
    is_pos[pos] = 1.0
    targets = encode(ANCHORS, gt[best_gt]).astype(np.float32)
    return is_pos, weights, targets, n_pos


def roi_targets(proposals, gt, gt_labels):
    """Proposal sampling for one image: ROIS boxes, their classes and box targets."""
    boxes = np.concatenate([proposals, gt], axis=0)
    iou = box_iou(boxes, gt)
    best_gt = iou.argmax(axis=1)
    best_iou = iou.max(axis=1)
    fg = np.flatnonzero(best_iou >= ROI_FG_IOU)
    bg = np.flatnonzero(best_iou < ROI_FG_IOU)
    n_fg = min(len(fg), int(ROIS * ROI_FG_FRACTION))
    fg = sample_rng.choice(fg, n_fg, replace=False)
    if len(bg) == 0:   # everything overlaps: fill up with foreground
        bg = sample_rng.choice(np.flatnonzero(best_iou >= ROI_FG_IOU), ROIS - n_fg)
        bg_label = False
    else:
        bg = sample_rng.choice(bg, ROIS - n_fg, replace=len(bg) < ROIS - n_fg)
        bg_label = True
    keep = np.concatenate([fg, bg])
    rois = boxes[keep]
    labels = gt_labels[best_gt[keep]] + 1
    if bg_label:
        labels[n_fg:] = 0
    targets = (encode(rois, gt[best_gt[keep]]) / BOX_STD).astype(np.float32)
    return rois.astype(np.float32), labels.astype(np.int32), targets, n_fg


def roi_align_plan(batch_index, rois):
    """ROI-Align's sampling plan, one sample per bin: for every ROI's POOL x POOL
    sample points, the flat indices of the 4 neighbouring feature-map cells (in the
    (B*FEAT*FEAT, C) view of the features) and their bilinear weights."""
    x1, y1, x2, y2 = (rois[:, i] / STRIDE for i in range(4))
    grid = (np.arange(POOL, dtype=np.float32) + 0.5) / POOL
    xs = np.clip(x1[:, None] + grid * (x2 - x1)[:, None] - 0.5, 0.0, FEAT - 1.0)  # (R, P)
    ys = np.clip(y1[:, None] + grid * (y2 - y1)[:, None] - 0.5, 0.0, FEAT - 1.0)
    x0, y0 = np.floor(xs).astype(np.int32), np.floor(ys).astype(np.int32)
    xb, yb = np.minimum(x0 + 1, FEAT - 1), np.minimum(y0 + 1, FEAT - 1)
    wx, wy = (xs - x0)[:, None, :], (ys - y0)[:, :, None]      # (R, 1, P), (R, P, 1)
    base = (batch_index * FEAT * FEAT)[:, None, None]

    def flat(yi, xi):
        return base + yi[:, :, None] * FEAT + xi[:, None, :]   # (R, P, P)

    index = np.stack([flat(y0, x0), flat(y0, xb), flat(yb, x0), flat(yb, xb)], axis=-1)
    weight = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], axis=-1)
    return index.astype(np.int32), weight.astype(np.float32)


# ------------------------------------------------------------------ the model

def init_params(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)

    def he(key, shape, fan_in, scale=1.0):
        return scale * jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)

    def conv(key, k, c_in, c_out, scale=1.0):
        return {"w": he(key, (k, k, c_in, c_out), k * k * c_in, scale),
                "b": jnp.zeros((c_out,), jnp.float32)}

    def dense(key, n_in, n_out, scale=1.0):
        return {"w": he(key, (n_in, n_out), n_in, scale), "b": jnp.zeros((n_out,), jnp.float32)}

    return {
        "backbone": [conv(keys[0], 3, 3, 16), conv(keys[1], 3, 16, CHANNELS),
                     conv(keys[2], 3, CHANNELS, CHANNELS)],
        "rpn": {"conv": conv(keys[3], 3, CHANNELS, CHANNELS),
                "obj": conv(keys[4], 1, CHANNELS, NUM_ANCHORS, 0.1),
                "box": conv(keys[5], 1, CHANNELS, 4 * NUM_ANCHORS, 0.1)},
        "head": {"fc": dense(keys[6], POOL * POOL * CHANNELS, 128),
                 "cls": dense(keys[7], 128, NUM_CLASSES + 1, 0.1),
                 "box": dense(jax.random.fold_in(keys[7], 1), 128, 4 * (NUM_CLASSES + 1), 0.1)},
    }


def conv2d(x, layer, stride=1):
    y = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["b"]


def backbone(params, images):
    b1, b2, b3 = params["backbone"]
    h = jax.nn.relu(conv2d(images, b1, 2))
    h = jax.nn.relu(conv2d(h, b2, 2))
    return jax.nn.relu(conv2d(h, b3, 1))


def rpn_head(params, feats):
    p = params["rpn"]
    h = jax.nn.relu(conv2d(feats, p["conv"]))
    n = feats.shape[0]
    objectness = conv2d(h, p["obj"]).reshape(n, -1)          # (B, H*W*A)
    deltas = conv2d(h, p["box"]).reshape(n, -1, 4)            # (B, H*W*A, 4)
    return objectness, deltas


def roi_align(feats, gather_index, gather_weight):
    """Bilinear ROI pooling with a host-made plan: (R, POOL, POOL, C)."""
    cells = feats.reshape(-1, feats.shape[-1])[gather_index]      # (R, P, P, 4, C)
    return jnp.sum(cells * gather_weight[..., None], axis=3)


def roi_head(params, pooled):
    p = params["head"]
    h = pooled.reshape(pooled.shape[0], -1)
    h = jax.nn.relu(h @ p["fc"]["w"] + p["fc"]["b"])
    cls = h @ p["cls"]["w"] + p["cls"]["b"]
    box = (h @ p["box"]["w"] + p["box"]["b"]).reshape(-1, NUM_CLASSES + 1, 4)
    return cls, box


def smooth_l1(x, beta):
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def loss_fn(params, images, rpn_is_pos, rpn_weights, rpn_box_targets,
            gather_index, gather_weight, roi_labels, roi_box_targets):
    feats = backbone(params, images)
    objectness, deltas = rpn_head(params, feats)
    n_sampled = jnp.sum(rpn_weights)
    rpn_cls = jnp.sum(rpn_weights * optax.sigmoid_binary_cross_entropy(
        objectness, rpn_is_pos)) / n_sampled
    rpn_box = jnp.sum(rpn_is_pos[..., None] * smooth_l1(
        deltas - rpn_box_targets, 1.0 / 9)) / n_sampled

    pooled = roi_align(feats, gather_index, gather_weight)
    cls_logits, box_deltas = roi_head(params, pooled)
    roi_cls = optax.softmax_cross_entropy_with_integer_labels(cls_logits, roi_labels).mean()
    # class-specific regression, foreground ROIs only
    onehot = jax.nn.one_hot(roi_labels, NUM_CLASSES + 1) * (roi_labels > 0)[:, None]
    picked = jnp.sum(box_deltas * onehot[..., None], axis=1)
    roi_box = jnp.sum(jnp.sum(smooth_l1(picked - roi_box_targets, 1.0), axis=1)
                      * (roi_labels > 0)) / roi_labels.shape[0]
    accuracy = jnp.mean(jnp.argmax(cls_logits, axis=1) == roi_labels)
    total = rpn_cls + rpn_box + roi_cls + roi_box
    return total, {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "roi_cls": roi_cls,
                   "roi_box": roi_box, "roi_acc": accuracy}


def rpn_forward(params, images):
    return rpn_head(params, backbone(params, images))


def train_step(params, opt_state, images, gt_boxes, gt_labels):
    # 1. RPN forward pass; proposals are made on the host from fetched outputs.
    objectness, deltas = rpn_forward(params, images)
    # 2. Host-side target assignment and sampling (numpy, per image).
    targets, info = host_targets(np.asarray(objectness), np.asarray(deltas), gt_boxes, gt_labels)
    # 3. Losses and gradients on the device.
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, *targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, parts, info


def host_targets(objectness, deltas, gt_boxes, gt_labels):
    """loss_fn's inputs after the images, and the batch's statistics, from the RPN outputs."""
    rpn_is_pos, rpn_weights, rpn_box_targets = [], [], []
    roi_batch, rois, roi_labels, roi_box_targets = [], [], [], []
    info = {"pos_anchors": 0, "proposals": 0, "fg_rois": 0, "recall": 0.0}
    n_gt = 0
    for i in range(objectness.shape[0]):
        proposals = propose(objectness[i], deltas[i])
        is_pos, weights, targets, n_pos = rpn_targets(gt_boxes[i])
        boxes, labels, box_targets, n_fg = roi_targets(proposals, gt_boxes[i], gt_labels[i])
        rpn_is_pos.append(is_pos)
        rpn_weights.append(weights)
        rpn_box_targets.append(targets)
        roi_batch.append(np.full(ROIS, i, np.int32))
        rois.append(boxes)
        roi_labels.append(labels)
        roi_box_targets.append(box_targets)
        info["pos_anchors"] += n_pos
        info["proposals"] += len(proposals)
        info["fg_rois"] += n_fg
        if len(proposals):
            info["recall"] += float(np.sum(box_iou(gt_boxes[i], proposals).max(axis=1) >= 0.5))
        n_gt += len(gt_boxes[i])
    info["recall"] /= n_gt

    gather_index, gather_weight = roi_align_plan(np.concatenate(roi_batch), np.concatenate(rois))
    targets = (np.stack(rpn_is_pos), np.stack(rpn_weights), np.stack(rpn_box_targets),
               gather_index, gather_weight, np.concatenate(roi_labels),
               np.concatenate(roi_box_targets))
    return targets, info


# The expert's version: the RPN forward in one jit, the host part as it is, loss +
# gradient + update in another jit.
_expert_rpn_forward = jax.jit(rpn_forward)
_expert_update = _common.jit_update(loss_fn, optimizer, has_aux=True)


def expert_train_step(params, opt_state, images, gt_boxes, gt_labels):
    objectness, deltas = _expert_rpn_forward(params, images)
    targets, info = host_targets(np.asarray(objectness), np.asarray(deltas), gt_boxes, gt_labels)
    params, opt_state, (loss, parts) = _expert_update(params, opt_state, images, *targets)
    return params, opt_state, loss, parts, info


EXPERT_STEPS = {"train_step": expert_train_step}


def run(wrap, steps, log=print, seed=0, timings=None):
    """The training loop; returns the final parameters."""
    global sample_rng
    sample_rng = np.random.RandomState(seed)
    data = make_dataset(seed)
    params = init_params(seed)
    opt_state = optimizer.init(params)
    step_fn = wrap(train_step)
    recalls = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        images, gt_boxes, gt_labels = data[(step - 1) % len(data)]
        params, opt_state, loss, parts, info = step_fn(
            params, opt_state, images, gt_boxes, gt_labels)
        recalls.append(info["recall"])
        if step % LOG_EVERY == 0:
            log(f"step {step} loss {float(loss):.4f} "
                + " ".join(f"{k} {float(v):.4f}" for k, v in parts.items())
                + f" | pos_anchors {info['pos_anchors']} proposals {info['proposals']} "
                  f"fg_rois {info['fg_rois']} recall@0.5 {np.mean(recalls):.3f}")
            recalls = []
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
