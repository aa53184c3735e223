"""The 5-point similarity warp of a frame to the 224x224 crop of the PD-FGC motion encoder.

Reference: `wan/models/pdf.py` (`umeyama`, `warp_face_pd_fgc`, `image_preprocess`). The numbers are
pinned by the golden case `face_numeric` (uint8-exact warp with OpenCV 4.11).
"""

from __future__ import annotations

import cv2
import numpy as np

# Landmarks of the 222-point layout used by the warp: left pupil, right pupil, nose tip, mouth corners.
PD_FGC_POINTS: tuple[int, ...] = (182, 202, 36, 149, 133)
# Where those points go, as fractions of the crop side (the reference's fixed template).
PD_FGC_TEMPLATE: np.ndarray = np.array(
    [[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]]
)
CROP_SIZE = 224


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool) -> np.ndarray:
    """Least-squares similarity transform mapping `src` [M, D] onto `dst` [M, D]; returns [D+1, D+1].

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    PAMI 1991 (equation numbers below). Returns NaN when every source point coincides (rank 0).

    Deviation (REFERENCE.md quirk 23): the reference multiplies by `Vh.T` where the paper has `V^T`
    (numpy's `Vh`). For the 2x2 covariances of real faces LAPACK returns a symmetric `Vh`, so both
    agree to ~1e-14; for mirrored point sets (det < 0) the reference's transform is not a
    least-squares fit. We use the paper's formula. The arithmetic otherwise follows the reference
    step by step (including its dtypes: float32 landmarks stay float32 until they meet float64), so
    the warp is pixel-exact on real faces.
    """
    num, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_centred = src - src_mean
    dst_centred = dst - dst_mean
    cov = np.dot(dst_centred.T, src_centred) / num  # Eq. (38)
    signs = np.ones((dim,), dtype=np.double)  # Eq. (39)
    if np.linalg.det(cov) < 0:
        signs[dim - 1] = -1
    transform = np.eye(dim + 1, dtype=np.double)
    u, s, vh = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.nan * transform
    if rank == dim - 1:  # Eq. (43): degenerate (collinear) source points
        if np.linalg.det(u) * np.linalg.det(vh) > 0:
            transform[:dim, :dim] = np.dot(u, vh)
        else:
            flipped = signs.copy()
            flipped[dim - 1] = -1
            transform[:dim, :dim] = np.dot(u, np.dot(np.diag(flipped), vh))
    else:
        transform[:dim, :dim] = np.dot(u, np.dot(np.diag(signs), vh))  # Eq. (40)
    # Eq. (41)-(42), in the reference's operation order (1/var * trace) for bit-equal results.
    scale = 1.0 / src_centred.var(axis=0).sum() * np.dot(s, signs) if estimate_scale else 1.0
    transform[:dim, dim] = dst_mean - scale * np.dot(transform[:dim, :dim], src_mean.T)
    transform[:dim, :dim] *= scale
    return transform


def pd_fgc_matrix(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The 2x3 affine taking a frame to the motion-encoder crop; `landmarks`: [222, 2] float32 pixels."""
    src = landmarks[list(PD_FGC_POINTS)]
    return umeyama(src, PD_FGC_TEMPLATE * size, True)[0:2]


def warp_face(frame: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """`frame`: [H, W, 3] uint8 (any channel order), `landmarks`: [222, 2] -> [size, size, 3] uint8.

    Bicubic, constant-zero border, as `warp_face_pd_fgc`.
    """
    return warp_with(frame, pd_fgc_matrix(landmarks, size), size)


def warp_with(frame: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """`frame` [H, W, 3] uint8 through the 2x3 `matrix` to [size, size, 3]: bicubic, zero border."""
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_CUBIC)


def encoder_input(crops_rgb: np.ndarray) -> np.ndarray:
    """Crops [N, 224, 224, 3] uint8 RGB -> motion-encoder input [N, 3, 224, 224] float32 in [-1, 1].

    `image_preprocess` of the reference: x/255*2-1 computed in float64, then float32, channels first.
    """
    scaled = crops_rgb / 255.0 * 2 - 1
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2), dtype=np.float32)


def image_preprocess(image_bgr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The reference's `image_preprocess` for one BGR image: resize (bilinear) to `size_wh` (w, h),
    BGR->RGB, x/255*2-1 -> [3, h, w] float32. Kept for parity checks; the pipeline's crops are already
    224x224 RGB and go through `encoder_input`."""
    width, height = size_wh
    resized = cv2.resize(image_bgr, (width, height))
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    return encoder_input(rgb[None])[0]
